"""Generate world-model rollouts into WebDataset shards (see `python jobs/generate.py --help`).

Locally:      python jobs/generate.py
On a cluster: ray job submit --working-dir . -- python jobs/generate.py --config jobs/configs/<name>.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
