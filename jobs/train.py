"""Ray job entry point: `qinco train` for `ray job submit`.

    ray job submit --submission-id train-$(date +%Y%m%d) --working-dir . -- python jobs/train.py ARGS...

Arguments are those of `qinco train --help`. Inside a Ray job, `RAY_ADDRESS` points at the
cluster, so the job attaches to it instead of starting a local Ray.
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
