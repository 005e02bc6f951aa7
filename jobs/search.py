"""Ray job entry point: `qinco search` for `ray job submit`.

    ray job submit --submission-id search-$(date +%Y%m%d) --working-dir . -- python jobs/search.py ARGS...

Arguments are those of `qinco search --help`. Inside a Ray job, `RAY_ADDRESS` points at the
cluster, so the job attaches to it instead of starting a local Ray.
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["search", *sys.argv[1:]]))
