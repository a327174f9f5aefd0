"""One line on an offline fine-tuning run: real success before and after, and what it used.

python scripts/offline_summary.py OUT   (OUT as in scripts/offline_finetune_*.sh)
"""

import json
import sys
from pathlib import Path


def main(out: Path) -> None:
    pre = json.loads((out / "eval-pretrained/eval.json").read_text())["success_rate"]
    ft = json.loads((out / "eval-finetuned/eval.json").read_text())["success_rate"]
    summary = json.loads((out / "finetune/summary.json").read_text())
    print(
        f"pre-trained {pre:.3f} -> offline fine-tuned {ft:.3f} ({100 * (ft - pre):+.1f} points), "
        f"online_env_steps={summary['online_env_steps']}, "
        f"play steps={summary['play_data']['steps']}"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
