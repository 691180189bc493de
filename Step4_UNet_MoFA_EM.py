"""Step4_UNet_MoFA_EM: not implemented yet (see the training-pipeline issue)."""
import sys


def main(argv=None) -> int:
    print("Step4_UNet_MoFA_EM: not implemented yet.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
