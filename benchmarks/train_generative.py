"""A generative recipe, measured: official VQA accuracy (and the other generative metrics), time to train,
wall time, peak memory. Writes JSON to ``--out``.

    python benchmarks/train_generative.py --config easy-vqa-gru --out benchmarks/results/train_easy_vqa_gru.json
    python benchmarks/train_generative.py --config easy-vqa-llm-stage1 --out benchmarks/results/train_easy_vqa_llm_stage1.json
    python benchmarks/train_generative.py --config easy-vqa-llm-stage2 --out benchmarks/results/train_easy_vqa_llm_stage2.json

``--cold`` starts from an empty feature cache. Targets (issue 4): GRU decoder >= 99 and LLM-prefix >= 97
official accuracy on easy-VQA test (LLM: on the documented subset of its config), on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import yaml

from vqakit.configs import resolve_config


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="easy-vqa-gru")
    ap.add_argument("--out_dir", default=None, help="run directory (default: the config's train.out_dir)")
    ap.add_argument("--cold", action="store_true", help="start from an empty feature cache")
    ap.add_argument("--out", default="benchmarks/results/train_easy_vqa_gru.json")
    args = ap.parse_args(argv)

    from vqakit.data.config import DataConfig
    from vqakit.models.gru_decoder import GRUDecoderConfig
    from vqakit.models.llm_prefix import LLMPrefixConfig
    from vqakit.models.vlm import VLMConfig
    from vqakit.train.config import TrainConfig
    from vqakit.train.generative import fit_generative
    from vqakit.train.run import peak_rss_mib

    cfg = yaml.safe_load(Path(resolve_config(args.config)).read_text())
    families = {"gru": GRUDecoderConfig, "llm": LLMPrefixConfig, "vlm": VLMConfig}
    (key,) = [k for k in families if k in cfg]
    data = DataConfig(**cfg.get("data", {}))
    if args.cold:
        data.cache_dir = tempfile.mkdtemp(prefix="vqakit-cold-cache-")
    train = TrainConfig(**{**cfg.get("train", {}), "progress": False,
                           **({"out_dir": args.out_dir} if args.out_dir else {})})
    start = time.perf_counter()
    summary = fit_generative(families[key](**cfg[key]), data, train)
    wall = time.perf_counter() - start
    m = summary["metrics"]
    result = {
        "benchmark": "train_generative", "config": args.config, "family": key, "cold_cache": args.cold,
        "test_questions": m["num_questions"], "test_vqa_accuracy": m["vqa_accuracy"],
        "test_per_answer_type": m["per_answer_type"], "generative": m["generative"], "decoding": m["decoding"],
        "time_to_train_s": summary["time_to_train_s"], "wall_s_total": round(wall, 1), "epochs": summary["epochs"],
        "train_questions": summary["num_train_questions"], "peak_rss_mib": round(peak_rss_mib(), 1),
        "parameters": summary["parameters"], "cpus": os.cpu_count(), "load_average_at_end": os.getloadavg(),
    }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
