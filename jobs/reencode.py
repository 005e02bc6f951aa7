"""Ray job entry point: `qinco reencode` for `ray job submit`.

    ray job submit --submission-id reencode-m2 --working-dir . -- \
        python jobs/reencode.py --index s3://bucket/index --model s3://bucket/models/m2 --keep 3

Arguments are those of `qinco reencode --help`. Inside a Ray job, `RAY_ADDRESS` points at the
cluster, so the job attaches to it instead of starting a local Ray. A job that failed is resumed
by submitting the same arguments again under a new submission id.
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["reencode", *sys.argv[1:]]))
