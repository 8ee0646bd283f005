"""`python -m ptst.bench.safety`: the same as `ptst bench safety`."""

import argparse
import sys

import ptst.bench.safety as safety

if __name__ == "__main__":
    _parser = argparse.ArgumentParser(
        prog="python -m ptst.bench.safety", description=safety.__doc__
    )
    safety.add_arguments(_parser)
    sys.exit(safety.run(_parser.parse_args()))
