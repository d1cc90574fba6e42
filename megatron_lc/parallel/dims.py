"""ParallelDims: the sizes of data, context and tensor parallelism, checked against the world, and the one mesh.

Mesh dimensions, outermost first: ``dp_replicate`` (HSDP replicas), ``dp_shard`` (FSDP2 shards), ``cp`` (one sequence
across ranks), ``tp`` (tensor parallel, innermost: the fastest links). Flattened views for the reductions:
``dp`` = dp_replicate x dp_shard (which samples a rank sees), ``dp_shard_cp`` (what FSDP2 shards parameters over:
CP ranks hold the same parameters and see different tokens, so they shard like data-parallel ranks), and ``dp_cp``
(the loss sum and token count are all-reduced over it). Hybrid context parallelism splits ``cp`` into
``cp_ring x cp_ulysses`` (Ulysses inside, on the faster links): the mesh is then 5-D.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

NAMES = ("dp_replicate", "dp_shard", "cp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    world_size: int
    cp_ulysses: int = 1
    """Ulysses degree inside cp (hybrid mode): cp = ring degree x cp_ulysses."""

    def __post_init__(self):
        if self.cp_ulysses < 1 or self.cp % self.cp_ulysses:
            raise ValueError(f"the Ulysses degree {self.cp_ulysses} must divide cp={self.cp}")
        sizes = [getattr(self, n) for n in NAMES]
        if any(s < 1 for s in sizes):
            raise ValueError(f"parallel sizes must be >= 1, got {dict(zip(NAMES, sizes))}")
        product = self.dp_replicate * self.dp_shard * self.cp * self.tp
        if product != self.world_size:
            raise ValueError(f"dp_replicate x dp_shard x cp x tp = {' x '.join(map(str, sizes))} = {product}, but the "
                             f"world has {self.world_size} processes: make the product equal the world size")

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp(self) -> int:
        """Ranks FSDP2 shards each parameter over (dp_shard x cp)."""
        return self.dp_shard * self.cp

    def build_mesh(self, device_type: str) -> tuple[DeviceMesh, dict[str, DeviceMesh]]:
        """The 4-D (5-D for hybrid CP) mesh with named dims (sizes of 1 included), and the flattened 1-D meshes ``dp``, ``dp_shard_cp``
        and ``dp_cp`` (kept here: slicing flattened dims from the root mesh is deprecated)."""
        cp_dims = ("cp_ring", "cp_ulysses") if self.cp_ulysses > 1 else ("cp",)
        names = ("dp_replicate", "dp_shard", *cp_dims, "tp")
        sizes = {"dp_replicate": self.dp_replicate, "dp_shard": self.dp_shard, "cp": self.cp,
                 "cp_ring": self.cp // self.cp_ulysses, "cp_ulysses": self.cp_ulysses, "tp": self.tp}
        mesh = init_device_mesh(device_type, tuple(sizes[n] for n in names), mesh_dim_names=names)
        flat = {"dp": mesh["dp_replicate", "dp_shard"]._flatten("dp"),
                "dp_shard_cp": mesh["dp_shard", *cp_dims]._flatten("dp_shard_cp"),
                "dp_cp": mesh["dp_replicate", "dp_shard", *cp_dims]._flatten("dp_cp")}
        return mesh, flat

    def cp_mesh(self, mesh: DeviceMesh) -> DeviceMesh:
        """The context-parallel sub-mesh: 1-D ``cp``, or 2-D ``(cp_ring, cp_ulysses)`` for hybrid."""
        return mesh["cp_ring", "cp_ulysses"] if self.cp_ulysses > 1 else mesh["cp"]
