"""Step1_Pretrain_MoFA: not implemented yet (see the training-pipeline issue)."""
import sys


def main(argv=None) -> int:
    print("Step1_Pretrain_MoFA: not implemented yet.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
