"""Ray job entry point: `qinco encode` for `ray job submit`.

    ray job submit --submission-id encode-$(date +%Y%m%d) --working-dir . -- python jobs/encode.py ARGS...

Arguments are those of `qinco encode --help`. Inside a Ray job, `RAY_ADDRESS` points at the
cluster, so the job attaches to it instead of starting a local Ray.
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["encode", *sys.argv[1:]]))
