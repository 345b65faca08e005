"""`python -m pdpipe.bench serve|compare|plot ...`: the same as `pdpipe bench ...`."""
import sys

from .cli import bench_main

sys.exit(bench_main(sys.argv[1:]))
