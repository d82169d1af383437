"""The between-image share of the pooled encoder features at initialisation, per dataset.

    python benchmarks/signal_share.py --data-root ../shared/data/medmnist \
        --dataset retinamnist --dataset bloodmnist --dataset organamnist --dataset adrenalmnist3d

The `tiny` preset (any field overridable with --model-option KEY=VALUE), seeded, untrained, encodes
the first 64 train images of each dataset; prints one JSON line per dataset: the share of the
variance of the encoder's pooled output that comes from differences between the images
(`medformer_core.reporting.signal`), averaged over --seeds initialisations. Without --data-root the
embedded phantoms are used.
"""

import argparse
import json
import sys

import torch

from medformer_core.api.datasets import resolve_dataset
from medformer_core.api.errors import MedformerError
from medformer_core.api.options import parse_options, split_pairs
from medformer_core.api.plugins import registries
from medformer_core.engine.builders import build_model
from medformer_core.model.medformer import ModelConfig
from medformer_core.reporting.signal import between_image_share, pooled_encoder_features


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", action="append", default=None)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--model-option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        pairs = split_pairs(args.model_option, "--model-option", "--model-option latent_pool=true")
        overrides = parse_options(ModelConfig, pairs, "--model-option")
    except MedformerError as error:
        sys.exit(f"error: {error}")
    for name in args.dataset or ["phantoms2d", "phantoms3d"]:
        try:
            factory, options = resolve_dataset(name, data_root=args.data_root)
            split = factory.build("train", options)
        except MedformerError as error:
            sys.exit(f"error: {error}")
        batch = {**split.batch(range(min(args.samples, len(split)))), "dataset": split.info.name}
        shares = []
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            model = build_model(args.model, [split.info], [registries().tasks.get("rotation")], **overrides).eval()
            shares.append(between_image_share(pooled_encoder_features(model, batch)))
        print(json.dumps({"dataset": split.info.name, "model": args.model, "model_options": overrides,
                          "samples": len(batch["image"]), "share": round(sum(shares) / len(shares), 4),
                          "share_per_seed": [round(s, 4) for s in shares]}), flush=True)


if __name__ == "__main__":
    main()
