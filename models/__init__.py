"""Model library: coefficient layout, face model, camera, shading, renderer, encoder, UNet and MoFA.

Only re-exports; importing does no work. The rasterizer lives in `models.rasterizer`.
"""
from models.camera import CameraConfig
from models.encoder import ResNetEncoder
from models.errors import FaceModelError, ModelInputError, WeightsError
from models.face_model import FaceModel
from models.layout import CoeffLayout, Coeffs
from models.mofa import MoFA
from models.renderer import FaceRenderer, RenderOutput
from models.unet import UNet

__all__ = ["CameraConfig", "CoeffLayout", "Coeffs", "FaceModel", "FaceModelError", "FaceRenderer", "MoFA",
           "ModelInputError", "RenderOutput", "ResNetEncoder", "UNet", "WeightsError"]
