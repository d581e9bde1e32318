"""Runs inside the LeRobot virtualenv (see tests/test_export_lerobot.py), never in the project's:
loads an exported dataset with LeRobot's own ``LeRobotDataset`` and dumps what it reads.

    python lerobot_reader.py DATASET_ROOT OUT_PREFIX   ->  OUT_PREFIX.npz, OUT_PREFIX.json
"""

import json
import sys

import numpy as np
from lerobot.datasets.lerobot_dataset import LeRobotDataset

ARRAYS = ("observation.images.rgb", "observation.depth", "observation.camera.intrinsics", "observation.camera.c2w",
          "observation.camera.commanded_c2w", "action", "timestamp", "frame_index", "episode_index", "index")


def main(root: str, out: str) -> None:
    dataset = LeRobotDataset("hero-rollouts/export", root=root, video_backend="torchcodec")
    items = [dataset[i] for i in range(len(dataset))]
    np.savez(f"{out}.npz", **{name: np.stack([item[name].numpy() for item in items]) for name in ARRAYS})
    step = 1 / dataset.fps
    windows = LeRobotDataset("hero-rollouts/export", root=root, video_backend="torchcodec",
                             delta_timestamps={"action": [0, step, 2 * step], "observation.images.rgb": [0, step]})
    window = windows[1]
    report = {
        "frames": len(dataset), "episodes": dataset.num_episodes, "fps": dataset.fps,
        "video_keys": dataset.meta.video_keys, "tasks": [item["task"] for item in items],
        "window_action": window["action"].numpy().tolist(), "window_rgb_shape": list(window["observation.images.rgb"].shape),
        "window_action_is_pad": window["action_is_pad"].numpy().tolist(),
        "stats_keys": sorted(dataset.meta.stats),
    }
    with open(f"{out}.json", "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
