"""ParallelDims: the sizes of data, context and tensor parallelism, checked against the world, and the meshes it owns.

Mesh dimensions, outermost first: ``dp_replicate`` (HSDP replicas), ``dp_shard`` (FSDP2 shards), ``cp`` (one sequence
across ranks), ``tp`` (tensor parallel, innermost: the fastest links). Flattened views for the reductions:
``dp`` = dp_replicate x dp_shard (which samples a rank sees), ``dp_shard_cp`` (what FSDP2 shards parameters over:
CP ranks hold the same parameters and see different tokens, so they shard like data-parallel ranks), and ``dp_cp``
(the loss sum and token count are all-reduced over it). Hybrid context parallelism splits ``cp`` into
``cp_ring x cp_ulysses`` (Ulysses inside, on the faster links): the mesh is then 5-D.

As TorchTitan's ``distributed/parallel_dims.py``: ``dp_shard=-1`` is resolved here, once; ``build_mesh`` builds every
mesh once and ``get_mesh(name)`` hands them out, so callers never carry meshes around.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..configtools import ConfigError


def check_sizes(dp_replicate: int, dp_shard: int, cp: int, tp: int) -> None:
    """Raise ConfigError, naming the ``parallel.*`` key, for a size below 1 (dp_shard may be -1); needs no world."""
    for name, size in (("dp_replicate", dp_replicate), ("cp", cp), ("tp", tp)):
        if size < 1:
            raise ConfigError(f"parallel.{name} must be >= 1, got {size}")
    if dp_shard < 1 and dp_shard != -1:
        raise ConfigError(f"parallel.dp_shard must be >= 1 or -1 (the rest of the world), got {dp_shard}")


@dataclass
class ParallelDims:
    """Sizes of each parallel dimension; ``dp_shard=-1`` takes what the world leaves after the others."""

    dp_replicate: int
    """Replicas of the model (HSDP: gradients all-reduced across them)."""
    dp_shard: int
    """FSDP2 shards of each replica; -1: world_size / (dp_replicate x cp x tp)."""
    cp: int
    """Context-parallel degree: ranks that split one sequence."""
    tp: int
    """Tensor-parallel degree (with sequence parallelism)."""
    world_size: int
    """Processes in the job; the product of the sizes must equal it."""
    cp_ulysses: int = 1
    """Ulysses degree inside cp (hybrid mode): cp = ring degree x cp_ulysses."""
    _meshes: dict[str, DeviceMesh] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        check_sizes(self.dp_replicate, self.dp_shard, self.cp, self.tp)
        if self.cp_ulysses < 1 or self.cp % self.cp_ulysses:
            raise ConfigError(f"the Ulysses degree parallel.cp_ulysses={self.cp_ulysses} must divide cp={self.cp}")
        others = self.dp_replicate * self.cp * self.tp
        if self.dp_shard == -1:
            if self.world_size % others:
                raise ConfigError(f"world size {self.world_size} is not divisible by dp_replicate x cp x tp = "
                                  f"{others}: launch a multiple of {others} processes or change parallel.*")
            self.dp_shard = self.world_size // others
        elif others * self.dp_shard != self.world_size:
            raise ConfigError(f"parallel dp_replicate x dp_shard x cp x tp = {self.dp_replicate} x {self.dp_shard} x "
                              f"{self.cp} x {self.tp} = {others * self.dp_shard} but the world has {self.world_size} "
                              f"processes; set parallel.dp_shard=-1 to fill the world")

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many different samples a step sees at once (dp_replicate x dp_shard)."""
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_gradient_divide_factor(self) -> int:
        """What FSDP2/HSDP divides summed gradients by (it averages over dp_replicate x dp_shard x cp); 1 means no
        FSDP reduction. The trainer multiplies its loss scale by it, so a step's gradient is the exact global mean."""
        return self.dp_replicate * self.dp_shard * self.cp

    def seq_len_divisor(self, cp_layout: str = "zigzag") -> int:
        """What a sample's length must divide by: the CP chunks (2 per rank for ``zigzag``, which hybrid uses too;
        1 for ``contiguous``, which Ulysses uses) times tp, since sequence parallelism splits each CP shard again."""
        chunks = 2 * self.cp if cp_layout == "zigzag" and self.cp > 1 else self.cp
        return chunks * self.tp

    # ---- meshes ------------------------------------------------------------------------------------------------
    def build_mesh(self, device_type: str) -> None:
        """Build, once, the 4-D (5-D for hybrid CP) mesh with named dims (sizes of 1 included) and the flattened
        meshes; collective (every rank calls it). ``get_mesh`` then returns them."""
        if self._meshes:
            raise RuntimeError("ParallelDims.build_mesh was already called: the meshes are built once")
        cp_dims = ("cp_ring", "cp_ulysses") if self.cp_ulysses > 1 else ("cp",)
        names = ("dp_replicate", "dp_shard", *cp_dims, "tp")
        sizes = {"dp_replicate": self.dp_replicate, "dp_shard": self.dp_shard, "cp": self.cp,
                 "cp_ring": self.cp // self.cp_ulysses, "cp_ulysses": self.cp_ulysses, "tp": self.tp}
        root = init_device_mesh(device_type, tuple(sizes[n] for n in names), mesh_dim_names=names)
        meshes = {n: root[n] for n in names}
        # Flattened here and kept: slicing flattened dims from the root mesh later is deprecated.
        meshes["dp"] = root["dp_replicate", "dp_shard"]._flatten("dp")
        meshes["dp_shard_cp"] = root["dp_shard", *cp_dims]._flatten("dp_shard_cp")
        meshes["dp_cp"] = root["dp_replicate", "dp_shard", *cp_dims]._flatten("dp_cp")
        if self.cp_ulysses > 1:
            meshes["cp"] = root["cp_ring", "cp_ulysses"]
        # HSDP: replicate over dp_replicate, shard over dp_shard x cp (a 2-D mesh); else 1-D.
        meshes["fsdp"] = root["dp_replicate", "dp_shard_cp"] if self.dp_replicate > 1 else meshes["dp_shard_cp"]
        self._meshes.update(meshes)

    def get_mesh(self, name: str) -> DeviceMesh:
        """The mesh called ``name``: a dim of the root (``dp_replicate``, ``dp_shard``, ``tp``, ``cp``: 1-D, or 2-D
        ``(cp_ring, cp_ulysses)`` for hybrid, then also ``cp_ring`` and ``cp_ulysses``), a flattened one (``dp``,
        ``dp_shard_cp``, ``dp_cp``) or ``fsdp`` (what FSDP2 shards over: 2-D ``(dp_replicate, dp_shard_cp)`` under
        HSDP, else ``dp_shard_cp``)."""
        if not self._meshes:
            raise RuntimeError("call ParallelDims.build_mesh(device_type) before get_mesh")
        if name not in self._meshes:
            raise KeyError(f"no mesh {name!r}: use one of {', '.join(self._meshes)}")
        return self._meshes[name]

    @property
    def device_type(self) -> str:
        """The device type the meshes were built for (``cuda`` or ``cpu``)."""
        return self.get_mesh("dp_cp").device_type
