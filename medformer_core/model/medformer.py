"""The Medformer: input adapters -> Input Adaptformer -> Body, and the Output Adaptformer.

    image [B, C, H, W] / volume [B, C, D, H, W]
      -> input adapter of its modality (patch embedding or a convolutional stem, + sin-cos
         positions) + dataset embedding                                    -> tokens  [B, N, E]
      -> Input Adaptformer: M learned latents (optionally each started from the mean of the tokens
         of its region of the input) cross-attend to the tokens           -> latents [B, M, E]
      -> Body: pre-norm transformer blocks over the latents, final LayerNorm
      -> Output Adaptformer (per task): queries cross-attend to the latents -> a task head

With `latents=0` the tokens go straight into the body (a plain ViT): the baseline and ablation.
The encoder (`Medformer`: adapters, dataset embeddings, latents, Input Adaptformer, body) exports to
`model.safetensors` + `config.json` and loads back with `Medformer.from_pretrained`.

Two options speed up fitting small sets (benchmarks/results/ablation_model.md): `latent_pool`
starts each latent from its own region of the input instead of from nearly identical learned
embeddings, and the `conv2d`/`conv3d` adapters put a convolutional stem before the latents. They
are not the defaults: on val, the 2D stem won after a short pretraining but lost after the
recipe's full one, and collapsed on one 1% label subset; the 3D stem was unstable.

Modalities: the model keeps one input adapter per (adapter, channel count), keyed e.g.
`patch3d_1ch`, shared by every dataset of that modality (a patch projection pretrained on one CT set
transfers to another); each dataset adds its own learned embedding, zero at start.
"""

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from medformer_core.api.errors import CheckpointError, UsageError
from medformer_core.api.interfaces import InputAdapter, InputSpec
from medformer_core.api.lookup import lookup, unknown_name
from medformer_core.api.registry import Registry
from medformer_core.model.blocks import Block, CrossBlock, init_weights
from medformer_core.model.intensity import IntensityStats, stats_key
from medformer_core.model.patches import grid_shape, sincos_position_embedding

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
EXPORT_FORMAT = "medformer-encoder"
EXPORT_VERSION = 2  # 2: intensity statistics, centred positions, raw values in the Input Adaptformer


@dataclass(frozen=True)
class ModelConfig:
    """Model hyper-parameters; `presets` holds the named ones (override any field by keyword)."""

    embed_dim: int = 192
    depth: int = 4
    heads: int = 3
    mlp_ratio: float = 4.0
    latents: int = 64  # M; 0 feeds the tokens straight to the body (plain ViT)
    latent_pool: bool = False  # each latent starts from the mean of its region's tokens (see latent_regions)
    patch2d: int = 4
    patch3d: int = 4
    adapter2d: str = "patch2d"
    adapter3d: str = "patch3d"
    drop_path: float = 0.0  # stochastic depth of the last body block (linear from 0)
    decoder_depth: int = 1  # cross-attention blocks in each task's Output Adaptformer
    qkv_bias: bool = True

    def __post_init__(self):
        if self.embed_dim % self.heads:
            raise UsageError(f"model width {self.embed_dim} is not divisible by {self.heads} heads")
        if min(self.embed_dim, self.depth, self.heads, self.patch2d, self.patch3d, self.decoder_depth) < 1:
            raise UsageError("model embed_dim, depth, heads, patch sizes and decoder_depth must be >= 1")
        if self.latents < 0 or not 0.0 <= self.drop_path < 1.0:
            raise UsageError("model latents must be >= 0 and drop_path in [0, 1)")

    def adapter_for(self, spatial_dims: int) -> tuple[str, int]:
        """The input adapter name and patch size for 2D or 3D inputs."""
        if spatial_dims == 2:
            return self.adapter2d, self.patch2d
        if spatial_dims == 3:
            return self.adapter3d, self.patch3d
        raise UsageError(f"inputs must be 2D [B, C, H, W] or 3D [B, C, D, H, W], got {spatial_dims} spatial dims")


PRESETS = {
    "tiny": ModelConfig(embed_dim=192, depth=4, heads=3, latents=32),
    "small": ModelConfig(embed_dim=384, depth=8, heads=6, latents=128, drop_path=0.1),
    "base": ModelConfig(embed_dim=768, depth=12, heads=12, latents=256, drop_path=0.1, decoder_depth=2),
}


def model_config(preset: "str | ModelConfig", **overrides) -> ModelConfig:
    """A preset's config (or `preset` itself) with `overrides` applied, checked by name."""
    base = preset if isinstance(preset, ModelConfig) else lookup(PRESETS, preset, "model preset")
    known = [f.name for f in dataclasses.fields(ModelConfig)]
    for key in overrides:
        if key not in known:
            raise unknown_name(f"unknown model option '{key}'", key, known)
    return dataclasses.replace(base, **overrides)


def modality_key(adapter: str, channels: int) -> str:
    """The name under which the model keeps an input adapter, e.g. `patch3d_1ch`."""
    return f"{adapter}_{channels}ch"


def module_key(name: str) -> str:
    """A dataset or task name as a module key (module names cannot hold dots)."""
    return name.replace(".", "_")


class Medformer(nn.Module):
    """The shared encoder: x [B, C, *S] of a known dataset -> latents [B, M, E] (tokens if M == 0).

    config:   the model hyper-parameters.
    inputs:   the (spatial dims, channels, size) inputs to embed; one adapter per modality.
    datasets: the dataset names that get a learned dataset embedding.
    input_adapters: the adapters by name (the plugins' registry), built per modality.
    """

    def __init__(self, config: ModelConfig, inputs: list[InputSpec], datasets: list[str],
                 input_adapters: Registry[InputAdapter]):
        super().__init__()
        self.config = config
        self.inputs: dict[str, InputSpec] = {}
        self.adapters = nn.ModuleDict()
        for spec in inputs:
            adapter, patch = config.adapter_for(spec.spatial_dims)
            key = modality_key(adapter, spec.channels)
            if key not in self.adapters:
                self.inputs[key] = spec
                self.adapters[key] = input_adapters.get(adapter).build(
                    channels=spec.channels, size=tuple(spec.size), embed_dim=config.embed_dim, patch=patch)
        self.datasets = list(dict.fromkeys(datasets))
        self.dataset_embed = nn.ParameterDict(
            {module_key(name): nn.Parameter(torch.zeros(config.embed_dim)) for name in self.datasets})
        channels = sorted({spec.channels for spec in inputs})
        self.intensity = nn.ModuleDict({stats_key(module_key(name), c): IntensityStats(c)
                                        for name in self.datasets for c in channels})
        self.latents = nn.Parameter(torch.zeros(config.latents, config.embed_dim)) if config.latents else None
        self.input_adaptformer = (
            CrossBlock(config.embed_dim, config.heads, config.mlp_ratio, qkv_bias=config.qkv_bias, raw_values=True)
            if config.latents else None
        )
        rates = [config.drop_path * i / max(1, config.depth - 1) for i in range(config.depth)]
        self.body = nn.ModuleList(
            Block(config.embed_dim, config.heads, config.mlp_ratio, rate, config.qkv_bias) for rate in rates)
        self.norm = nn.LayerNorm(config.embed_dim)
        for name, module in self.named_modules():
            if not name.startswith("adapters"):
                init_weights(module)
        if self.latents is not None:
            nn.init.trunc_normal_(self.latents, std=0.02)

    def adapter_for(self, x: torch.Tensor) -> nn.Module:
        """The input adapter of `x`'s modality: x [B, C, H, W] or [B, C, D, H, W]."""
        adapter, _ = self.config.adapter_for(x.ndim - 2)
        key = modality_key(adapter, x.shape[1])
        if key not in self.adapters:
            built = ", ".join(f"{k} ({s.spatial_dims}D, {s.channels} channels)" for k, s in self.inputs.items())
            raise UsageError(f"this model has no input adapter for {x.ndim - 2}D inputs with {x.shape[1]} channels "
                             f"(input shape {list(x.shape)}); it was built for: {built}",
                             hint="build the model with a dataset of this modality")
        return self.adapters[key]

    def embed(self, x: torch.Tensor, dataset: str, keep: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, C, *S] -> tokens [B, N, E] ([B, n_keep, E] with keep [B, n_keep]).

        x is standardised with its dataset's intensity statistics (`medformer_core.model.intensity`)
        before its adapter embeds it.
        """
        key = module_key(dataset)
        if key not in self.dataset_embed:
            raise UsageError(f"this model has no embedding for dataset '{dataset}'",
                             hint=f"it was built for: {', '.join(self.datasets)}")
        adapter = self.adapter_for(x)
        x = self.intensity[stats_key(key, x.shape[1])](x)
        return adapter(x, keep) + self.dataset_embed[key]

    def adapt(self, tokens: torch.Tensor, regions: torch.Tensor | None = None) -> torch.Tensor:
        """Input Adaptformer: tokens [B, N, E] -> latents [B, M, E]; identity when M == 0.

        With `regions` [B, N] (the latent region of each token, see `latent_regions`), each latent
        starts from its learned embedding plus the mean of its region's tokens, then reads all tokens.
        """
        if self.latents is None:
            return tokens
        latents = self.latents.expand(tokens.shape[0], -1, -1)
        if regions is not None:
            latents = latents + region_means(tokens, regions, self.config.latents)
        return self.input_adaptformer(latents, tokens)

    def forward_body(self, latents: torch.Tensor) -> torch.Tensor:
        """Body: latents [B, M, E] -> [B, M, E] (normalised)."""
        for block in self.body:
            latents = block(latents)
        return self.norm(latents)

    def regions_of(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor | None:
        """The latent region of each embedded token of x [B, C, *S]: [B, N | n_keep]; None without pooling."""
        if self.latents is None or not self.config.latent_pool:
            return None
        grid = grid_shape(tuple(x.shape[2:]), tuple(self.adapter_for(x).patch_size))
        regions = latent_regions(grid, self.config.latents, x.device)
        if keep is None:
            return regions.expand(x.shape[0], -1)
        return regions[keep]

    def forward(self, x: torch.Tensor, dataset: str, keep: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, C, *S] of `dataset` -> latents [B, M, E] (or tokens [B, N | n_keep, E] if M == 0)."""
        return self.forward_body(self.adapt(self.embed(x, dataset, keep), self.regions_of(x, keep)))

    def export_config(self) -> dict:
        return {
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "model": dataclasses.asdict(self.config),
            "inputs": [dataclasses.asdict(spec) for spec in self.inputs.values()],
            "datasets": self.datasets,
        }

    def save_pretrained(self, directory: "str | Path") -> Path:
        """Write `model.safetensors` (state-dict key names) and `config.json` into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": EXPORT_FORMAT})
        (directory / CONFIG_FILE).write_text(json.dumps(self.export_config(), indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, directory: "str | Path", input_adapters: Registry[InputAdapter]) -> "Medformer":
        """Rebuild the exported encoder in `directory` (its adapters from `input_adapters`) and load
        its weights (exactly, on CPU)."""
        directory = Path(directory)
        exported = read_export_config(directory)
        try:
            config = ModelConfig(**exported["model"])
            inputs = [InputSpec(s["spatial_dims"], s["channels"], tuple(s["size"])) for s in exported["inputs"]]
            datasets = list(exported["datasets"])
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"{directory / CONFIG_FILE} is not a medformer encoder config: {exc}") from None
        encoder = cls(config, inputs, datasets, input_adapters)
        missing, unexpected = load_encoder_weights(encoder, directory)
        if missing or unexpected:
            raise CheckpointError(
                f"{directory / WEIGHTS_FILE} does not match its config.json (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]})", hint="export the encoder again")
        return encoder


def latent_grid(latents: int, dims: int) -> tuple[int, ...]:
    """Split M latents into a `dims`-D grid as even as it can be: 32 -> (4, 8) or (2, 4, 4)."""
    if dims == 1:
        return (latents,)
    side = max(d for d in range(1, latents + 1) if latents % d == 0 and d ** dims <= latents)
    return (side,) + latent_grid(latents // side, dims - 1)


@functools.lru_cache(maxsize=64)
def latent_regions(grid: tuple[int, ...], latents: int, device: torch.device | None = None) -> torch.Tensor:
    """The latent each token of a patch grid pools into: [N] int64 on `device`, row-major like the
    tokens (cached per grid and device: no host-to-device copy per step).

    The M latents tile the input as a coarse grid (`latent_grid`); token (i, j, ...) goes to latent
    cell (i * L0 // G0, j * L1 // G1, ...). A latent cell that no token reaches keeps only its
    learned embedding.
    """
    cells = sorted(latent_grid(latents, len(grid)), reverse=True)
    order = sorted(range(len(grid)), key=lambda axis: -grid[axis])  # the longest input axes get the most cells
    shape = [0] * len(grid)
    for axis, count in zip(order, cells):
        shape[axis] = count
    coords = torch.meshgrid(*[torch.arange(g) * c // g for g, c in zip(grid, shape)], indexing="ij")
    region = torch.zeros(grid, dtype=torch.long)
    for axis, coord in enumerate(coords):
        region = region * shape[axis] + coord
    return region.flatten().to(device)


def region_means(tokens: torch.Tensor, regions: torch.Tensor, latents: int) -> torch.Tensor:
    """tokens [B, N, E], regions [B, N] -> the mean token of each region [B, M, E] (0 where empty)."""
    b, _, e = tokens.shape
    index = regions.unsqueeze(-1).expand(-1, -1, e)
    sums = tokens.new_zeros(b, latents, e).scatter_add_(1, index, tokens)
    counts = tokens.new_zeros(b, latents, 1).scatter_add_(1, regions.unsqueeze(-1),
                                                          tokens.new_ones(b, regions.shape[1], 1))
    return sums / counts.clamp_min(1.0)


def read_export_config(directory: Path) -> dict:
    """The parsed `config.json` of an exported encoder; a clear CheckpointError otherwise."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} holds no exported encoder ({CONFIG_FILE} is missing)",
                              hint="export one with Medformer.save_pretrained")
    try:
        exported = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(exported, dict) or exported.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{path} is not a medformer encoder config (format is not '{EXPORT_FORMAT}')")
    if exported.get("version") != EXPORT_VERSION:
        raise CheckpointError(f"{path} has export version {exported.get('version')}; this medformer reads "
                              f"version {EXPORT_VERSION}")
    return exported


def load_encoder_weights(encoder: Medformer, directory: Path) -> tuple[list[str], list[str]]:
    """Load what matches from `directory/model.safetensors` into `encoder`.

    Returns (missing, unexpected) key lists; a corrupt file or a tensor of the wrong shape is a
    CheckpointError (the export was made with another width, patch size or channel count).
    """
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} holds no encoder weights ({WEIGHTS_FILE} is missing)")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}", hint="the file is damaged; export it again") from None
    own = encoder.state_dict()
    for key, tensor in tensors.items():
        if key in own and own[key].shape != tensor.shape:
            raise CheckpointError(
                f"{path}: '{key}' has shape {list(tensor.shape)}, this model expects {list(own[key].shape)}",
                hint="build the model with the exported encoder's preset and patch sizes")
    usable = {k: v for k, v in tensors.items() if k in own}
    encoder.load_state_dict(usable, strict=False)
    return sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))


class OutputAdaptformer(nn.Module):
    """A task's queries cross-attend to the latents: latents [B, M, E] -> features [B, Q, E].

    Learned queries (`num_queries`), or with `grid` one query per patch of that grid: the fixed
    sin-cos position embedding of the patch plus a learned query embedding; `positions` [B, Q]
    then picks the patches to decode (MAE's masked ones), None decodes all.
    """

    def __init__(self, config: ModelConfig, num_queries: int = 1, grid: tuple[int, ...] | None = None):
        super().__init__()
        e = config.embed_dim
        if grid is None:
            self.queries = nn.Parameter(torch.zeros(num_queries, e))
            nn.init.trunc_normal_(self.queries, std=0.02)
        else:
            self.query_embed = nn.Parameter(torch.zeros(e))
            nn.init.trunc_normal_(self.query_embed, std=0.02)
            self.register_buffer("positions", sincos_position_embedding(grid, e), persistent=False)
        self.grid = grid
        self.blocks = nn.ModuleList(CrossBlock(e, config.heads, config.mlp_ratio, qkv_bias=config.qkv_bias)
                                    for _ in range(config.decoder_depth))
        self.blocks.apply(init_weights)

    def make_queries(self, batch: int, positions: torch.Tensor | None) -> torch.Tensor:
        """-> queries [B, Q, E]."""
        if self.grid is None:
            return self.queries.expand(batch, -1, -1)
        if positions is None:
            return (self.positions + self.query_embed).expand(batch, -1, -1)
        return self.positions[positions] + self.query_embed

    def forward(self, latents: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        queries = self.make_queries(latents.shape[0], positions)
        for block in self.blocks:
            queries = block(queries, latents)
        return queries
