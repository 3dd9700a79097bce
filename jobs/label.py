"""Label every image under a folder, bucket prefix, tar or parquet set (Ray Data, resumable).

On a cluster:
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/label.py \
        --input s3://bucket/photos/ --output s3://bucket/labels/ \
        --checkpoint s3://models/beit-ft/ --task classify --predict.top_k 5 \
        --actors.max_actors 8 --actors.num_gpus 1

Locally:
    python jobs/label.py --input ./photos --output ./labels --checkpoint ./runs/ft/ --task embed

Label the data pipeline's containers (``--layout`` auto detects; or files, class_tars,
webdataset, parquet, manifest):
    python jobs/label.py --input s3://bucket/imagenet22k-tars/ --output s3://bucket/labels22k/ \
        --checkpoint s3://models/beit-ft/ --layout class_tars --chunk_size 1024

Input: files under --input (class folders are fine); per-class tars or WebDataset shards (one
row per image member, path = "<tar uri>/<member>"; a tar that cannot be listed to its end adds
one error row with path = "<tar uri>"); parquet files with an image-bytes column
(--image_column; path = "<parquet uri>#<row index>"); or a .parquet/.csv manifest with a
``uri`` column. Output: part-NNNNN.parquet (one row per image: path, error, and top_ids /
top_labels / top_scores, embedding, or mask_uri + class_ids / pixel_counts), _masks/ for
segment, _SUMMARY.json. Rerunning the same command after an interruption finishes the rest.
Credentials come from AWS_* variables (or --storage.*); they are never printed.
``python jobs/label.py --help`` lists every option; --dry-run prints the plan and exits; --verbose
also shows Ray's output, which otherwise goes to <output>/_job.log.
"""

from __future__ import annotations

import sys

from beit_ray import console, plan
from beit_ray.config import job_flags, parse_args, run_job, save_config
from beit_ray.infer.config import LabelConfig
from beit_ray.infer.label import SUMMARY_NAME, check_outputs, label
from beit_ray.storage import join


def main(argv: list[str] | None = None) -> int:
    flags, argv = job_flags(argv)
    cfg = parse_args(LabelConfig, argv)
    cfg.require()
    lines = plan.label(cfg)
    if not console.begin(lines, flags, console.log_path_for(cfg.output, "label", "_job.log")):
        return 0
    check_outputs(cfg)  # shared storage on a multi-node cluster, before anything is written
    save_config(cfg, join(cfg.output, "_CONFIG.yaml"))  # the resolved config, secrets redacted
    console.stage("labelling")
    summary = label(cfg)
    console.show(
        f"results: {cfg.output} (part-*.parquet); summary: {join(cfg.output, SUMMARY_NAME)}"
    )
    return 0 if summary["files"] else 1


if __name__ == "__main__":
    sys.exit(run_job(main))
