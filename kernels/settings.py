"""Kernel settings: frozen, hashable, passed statically (as JAX's `BlockSizes` for `mha`).

Every choice here changes speed only, never the result beyond float rounding. The defaults
are what measured fastest on an H100 (BENCHMARKS.md, "Kernel settings"); `KernelSettings`
bundles them for `kernels.get_backend`, `SparseAttention(kernel_settings=...)` and the
bench scripts.
"""

from __future__ import annotations

import dataclasses

from kernels.compress_matmul import GroupedMatmulTiles, MatmulTiles  # noqa: F401  (re-exported)

# Programs per SM that keep an H100 (132 SMs) busy enough where a kernel splits its work to fill the
# GPU (the selection's d(block keys)); the flash dk/dv kernels measured best at 4x as many.
H100_SMS = 132
PROGRAMS_PER_SM = 4


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Flash kernels (compressed branch, sliding window): tile sizes and launch parameters.

    Rows are query tokens x the g query heads of a kv head.
    """

    rows_fwd: int = 128
    block_k_fwd: int = 64
    rows_dq: int = 64
    block_k_dq: int = 64
    rows_dkv: int = 64
    block_k_dkv: int = 64
    # 4 warps at every head dim: at head dim 128 (H200, T = 64k) 8 warps made the compressed
    # branch's backward 1.7x slower and its forward no faster.
    num_warps: int = 4  # every flash kernel but the forward
    num_warps_fwd: int = 4  # the forward
    num_stages: int = 2
    # dk/dv: a key tile's query range is split over up to this many programs (partial sums
    # added in XLA) so that the few compressed key tiles still fill the GPU ...
    max_dkv_splits: int = 64
    dkv_tiles_per_program: int = 256
    # ... and split further, down to min_dkv_tiles_per_program query tiles per program, until
    # about this many programs run: with few key tiles (the seed's 257 compressed keys at
    # T = 4096 make 5) the unsplit grid left most SMs idle. 2 rather than 8: at short lengths the
    # splits' programs all run at once and the longest query range sets the time (seed model,
    # float32 train step, H200, 2026-12-01, B = 4, T = 512, us per step: compressed dk/dv 225 -> 69,
    # sliding-window dk/dv 116 -> 98; 1 tile: 68 and 141). Long sequences reach the target first.
    # 8 programs per SM rather than 4: at T = 16384 (68 compressed key-tile programs per split) 16
    # splits instead of 8 even out the key tiles' unequal query ranges (H200, 2026-12-02, seed model,
    # float32: the compressed dk/dv kernel 0.55 -> 0.47 ms per layer, 2 programs per SM 0.72; the
    # train step 30.74 / 30.74 -> 30.40 / 30.42 ms back to back in two rounds; T = 4096 8.67 / 8.69 ->
    # 8.69 / 8.68; B = 4, T = 512 unchanged, its split count capped by min_dkv_tiles_per_program).
    # 16 per SM rather than 8 (H200, 2026-12-02, same step, ms back to back in four rounds over two
    # machines' starts: T = 16384 30.32 / 30.31 / 30.27 / 30.27 against 30.48 / 30.46 / 30.43 / 30.44;
    # T = 4096 8.73 / 8.73 against 8.72 / 8.72 and B = 4, T = 512 5.13 / 5.13 against 5.14 / 5.14).
    dkv_target_programs: int = 4 * PROGRAMS_PER_SM * H100_SMS
    min_dkv_tiles_per_program: int = 2
    # ... but no more splits than keep their float32 partials (dk and dv of every key, per split)
    # within this many bytes: 64 splits of a 4M-token sequence's 256k compressed keys, over 4 GPUs,
    # would write 34 GB per call.
    dkv_partial_bytes: int = 2**31
    # The sliding window's backward: "split" (a dq kernel, then the dk/dv kernel, each computing the
    # logits) or "fused" (the dk/dv kernel also writes each query tile's share of dq, ds @ k, to one of
    # a few per-key-tile slots that XLA sums: the logits once). "split" stays the default: "fused"
    # measured no faster (H200, 2026-12-02, seed model, float32; the window's kernels at T = 16384
    # 0.32 against 0.34 ms of GPU time per layer, but the train step 30.43 / 30.41 against 30.48 /
    # 30.46 ms back to back at T = 16384, and 18.70 / 18.70 against 18.49 / 18.48 at B = 4 x 4, T = 512).
    window_bwd: str = "split"

    def __post_init__(self):
        _check(self.window_bwd in ("split", "fused"), f"window_bwd must be split or fused, got {self.window_bwd!r}")


SELECTED_IMPLS = ("auto", "query", "tiled", "xla")


@dataclasses.dataclass(frozen=True)
class SelectedSettings:
    """Selected (fine) attention: which kernel family, and how its dk/dv work is split.

    impl: "query" (`kernels.selected_query`: one program per query and selection group; dk/dv
    by a kernel over the inverted index), "tiled" (`kernels.selected_tiled`: one program per
    tile of `tile_rows` rows walking the union of the blocks its queries selected), "xla" (no
    kernel: the reference's dense masked attention in XLA, [n, n] logits per head, its backward
    recomputing them; for short sequences, where the kernels' fixed costs dominate), or "auto":
    tiled when a selection group has fewer rows than the matrix unit's 16 (the seed model's
    2 heads per kv head), per-query otherwise (the paper's 16). Measured on an H100 in
    BENCHMARKS.md, "Kernel settings"; the per-query kernels' warps, stages and dk/dv chunk on
    an H200 (fla's configuration at T = 64k, BENCHMARKS.md "Selected attention per query tile").
    """

    impl: str = "auto"
    # tiled: rows per tile (queries per tile = tile_rows // group rows). Fewer queries per tile walk a
    # smaller union of picked blocks: the seed model (g = 2, bf16, H200, 2026-11-30) fwd+bwd 16 / 32 / 64
    # rows: 0.62 / 0.64 / 0.63 ms at T = 2048, 0.79 / 1.00 / 0.85 at 4096, 2.49 / 3.16 / 2.77 at 16384;
    # its float32 train step, 16 / 64 rows: 8.5-8.8 / 9.0-9.6 ms at T = 2048, 13.4-13.6 / 14.8-15.1 at 4096.
    tile_rows: int = 16
    tiles_per_dkv_split: int = 16  # tiled dk/dv: one more program per block per this many tiles
    dkv_entries_per_program: int = 256  # per-query dk/dv: one more program per block per this many entries
    dkv_chunk: int = 4  # per-query dk/dv: entries of a block's query list gathered into one step's tile
    query_num_warps: int = 2  # per-query forward and recomputing dq kernels
    query_num_stages: int = 3  # per-query forward kernel and the recomputing dq kernel
    # The stored-dlogits dq kernel (one contiguous ds tile per block): 2 stages, ~0.35 ms faster than 3
    # at T = 64k (fla config, H200, three alternating runs; the forward is 0.2 ms slower on 2).
    dq_num_stages: int = 2
    # ... on 1 warp: its matmul's columns (the head dim) then stay in one warp, so the per-block dgate
    # sums need no shared memory (H200, fla config, T = 64k: dq 11.12 -> 10.89 and 11.20 -> 10.99 ms
    # in two calls).
    dq_num_warps: int = 1
    dkv_num_warps: int = 4  # per-query dk/dv kernel
    dkv_num_stages: int = 2  # per-query dk/dv kernel
    # Per-query family, unpacked: the dk/dv kernel (run first) also stores the dlogits of every
    # (query, selected block) pair, so that dq reads K alone, one matmul per block, instead of
    # recomputing the logits from K and V. Costs a transient buffer of k' x block x G elements
    # per query and kv head in the inputs' dtype (8x the size of q at the paper's configuration).
    store_dlogits: bool = True
    max_dkv_splits: int = 8  # either dk/dv kernel: programs sharing one key block at most
    # Tiled dk/dv: each split writes float32 partials of every key block (dk and dv), summed after;
    # fewer splits where they would pass this many bytes. Measured (H200, 2026-11-30, seed model,
    # T = 256k over 2 GPUs, 24k key blocks per shard): 8 splits 538.5 ms per step, 25.7 GiB; 2 splits
    # 516.9 ms, 21.2 GiB; 1 split 521.7 ms, 20.3 GiB. At 64k on one GPU (4k blocks) all 8 stay.
    dkv_partial_bytes: int = 2**31
    # Per-query dk/dv, from this many key blocks on: a block's list splits by query range, so the
    # programs that run together gather q and dO from one range that L2 holds (fla config, H200: T =
    # 64k, dk/dv 13.71 -> 13.23 ms); below, by equal counts: fewer programs, and the range splits'
    # longest one (the densest range, next to the block) sets the time (T = 8k: 1.89 against 2.14).
    dkv_range_split_blocks: int = 1024
    # Tiled kernels: a 16-row tile ([16, 16] logits) has work for one or two warps; more split it
    # finer and leave fewer programs resident per SM. The float32 train step (seed model, H200,
    # 2026-12-01, us per step for forward / dq / dk/dv, 4 -> 2 -> 1 warps): T = 16384 3117 -> 2044 ->
    # 1620 / 5085 -> 3497 -> 3413 / 8259 -> 7050 -> 6922; T = 2048 374 -> 247 -> 231 / 544 -> 501 -> 408
    # / 796 -> 662 -> 722; B = 4, T = 512 268 -> 198 -> 191 / 407 -> 317 -> 335 / 500 -> 406 -> 412.
    num_warps: int = 1  # tiled forward and dq kernels
    tiled_dkv_num_warps: int = 2  # tiled dk/dv kernel
    # Tiled family, unpacked: dk/dv from "queries" (the per-query family's kernel: each key block
    # gathers just the queries that picked it, tiled_dkv_chunk of them a step, at least the matrix
    # unit's 16 rows) or "tiles" (each key block walks the query tiles whose union holds it, every row
    # of the tile through the matrix unit; with random picks a tile's rows rarely share a block, so
    # most of them are masked). Packed sequences always take "tiles". The seed model's float32 train
    # step (H200, 2026-12-01, ms synced / back to back): tiles / queries (chunk 8) / queries (chunk 16)
    # at B = 1, T = 16384: 40.32 / 36.87 / 35.81 and 38.77 / 35.81 / 34.65; T = 2048: 8.14 / 7.74 /
    # 7.72 and 6.68 / 6.73 / 6.45; B = 4, T = 512: 7.02 / 6.84 / 7.06 and 5.81 / 5.74 / 5.64. Its dk/dv
    # kernel at T = 16384: 6.92 ms (tiles) -> 6.16 (queries, chunk 8).
    tiled_dkv: str = "queries"
    tiled_dkv_chunk: int = 16  # tiled_dkv="queries": queries gathered per step (a power of two)
    # tiled_dkv="queries": one more program per key block per this many (query, block) entries on
    # average (the per-query family's dkv_entries_per_program, at most max_dkv_splits programs). The
    # seed's picks average 64 entries a block, but the earliest blocks get several times that: 4
    # programs a block instead of 1 cut its dk/dv 303 -> 227 us per step at B = 4, T = 512 (H200,
    # 2026-12-01; 8 programs: 277); no change at T = 16384.
    tiled_dkv_entries_per_program: int = 16
    # Tiled family, tiled_dkv="queries": dq from "stored" (that dk/dv kernel also stores the dlogits
    # of every (query, selected block) pair and the per-query family's dq kernel reads them with K
    # alone: work in proportion to the picks, not to the tile's union of them) or "tiles" (the tiled
    # dq kernel, recomputing each walked block's logits for every row of the tile; what tiled_dkv=
    # "tiles" and packed sequences always take). The seed model's float32 train step (H200,
    # 2026-12-01, ms synced / back to back, tiles -> stored): T = 16384 35.63 / 34.27 -> 33.93 / 32.61
    # (dq 3.40 -> 1.48 ms, dk/dv 3.72 -> 4.05); T = 2048 7.31 / 6.39 -> 7.52 / 6.33; B = 4, T = 512
    # 6.49 / 5.56 -> 6.48 / 5.45; peak memory unchanged.
    tiled_dq: str = "stored"
    num_stages: int = 2  # tiled kernels

    def __post_init__(self):
        _check(self.impl in SELECTED_IMPLS, f"impl must be one of {', '.join(SELECTED_IMPLS)}, got {self.impl!r}")
        for name in ("tile_rows", "tiles_per_dkv_split", "dkv_entries_per_program", "dkv_chunk", "max_dkv_splits",
                     "num_warps", "num_stages", "query_num_warps", "query_num_stages", "dq_num_stages", "dq_num_warps",
                     "dkv_num_warps", "dkv_num_stages", "dkv_range_split_blocks", "dkv_partial_bytes",
                     "tiled_dkv_num_warps", "tiled_dkv_chunk", "tiled_dkv_entries_per_program"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("dkv_chunk", "tiled_dkv_chunk"):
            value = getattr(self, name)
            _check(value & (value - 1) == 0, f"{name} must be a power of two, got {value}")
        _check(self.tiled_dkv in ("tiles", "queries"), f"tiled_dkv must be tiles or queries, got {self.tiled_dkv!r}")
        _check(self.tiled_dq in ("tiles", "stored"), f"tiled_dq must be tiles or stored, got {self.tiled_dq!r}")


def query_dkv_splits(settings: SelectedSettings, nq: int, num_sel: int, groups_per_kv: int, nb: int) -> int:
    """Per-query dk/dv kernel: programs sharing one key block's query list. Split when blocks are
    selected by many queries on average (early blocks get several times the mean under causal
    selection)."""
    entries_per_block = (nq * num_sel * groups_per_kv) // nb
    return max(1, min(settings.max_dkv_splits, entries_per_block // settings.dkv_entries_per_program))


SELECTION_IMPLS = ("pallas", "xla")
SELECTION_TOP_K = ("rounds", "lanes")


@dataclasses.dataclass(frozen=True)
class SelectionSettings:
    """Block selection (`kernels.selection`): tiles of the streaming top-k kernels.

    Forward and dq: `rows` query rows (tokens x the kv head's selection heads) per program,
    streaming `block_keys` block keys per step. d(block keys): `block_keys_dbk` blocks per
    program, over query tiles of `rows_dbk` rows, the queries of a chunk split over programs
    until about `dbk_target_programs` run (at most `max_dbk_splits`, at least
    `min_dbk_tiles_per_split` query tiles each), with `num_warps_dbk` warps (None: 8 for head
    dims >= 128, else 4; measured on an H200, BENCHMARKS.md "Selection kernel").
    impl "xla": no kernel, the reference's dense importance scores ([b, h, n, n / stride]) and
    top-k in XLA, the backward recomputing them; for short sequences.
    top_k: how the forward keeps each row's running top-k. "rounds": k vectors per row, a chunk's
    better entries inserted one per round (two row reductions a round); "lanes": k entries per
    row and column lane over steps of `lane_keys` blocks, elementwise, the lanes merged once per
    tile (only while the picks' slots, a power of two >= k, are at most `max_lane_picks`: 2k
    arrays of [rows, lane_keys] live in registers). Measured on an H200 (2026-12-02, seed model): the
    forward kernel alone 0.25 ("rounds") against 0.26 ms at T=16384, the float32 train step 0.06-0.13 ms
    faster at T=16384 back to back and 0.01-0.04 ms slower at B=4 T=512: the rounds were not what the
    kernel spends its time on; "rounds" stays the default.
    """

    impl: str = "pallas"
    rows: int = 64
    block_keys: int = 64
    rows_dbk: int = 64
    block_keys_dbk: int = 128
    max_dbk_splits: int = 16
    dbk_target_programs: int = PROGRAMS_PER_SM * H100_SMS
    # 2 rather than 8: the seed model's float32 train step (H200, 2026-12-01, B = 4, T = 512): the
    # d(block keys) kernel 133 -> 46 us per step (16 query tiles at T = 512: 2 splits of 8 before, 8 of 2 now).
    min_dbk_tiles_per_split: int = 2
    num_warps: int = 4
    num_warps_dbk: int | None = None
    num_stages: int = 2
    top_k: str = "rounds"
    lane_keys: int = 32
    max_lane_picks: int = 8

    def __post_init__(self):
        _check(self.top_k in SELECTION_TOP_K, f"top_k must be one of {', '.join(SELECTION_TOP_K)}, got {self.top_k!r}")
        _check(self.impl in SELECTION_IMPLS, f"impl must be one of {', '.join(SELECTION_IMPLS)}, got {self.impl!r}")
        for name in ("rows", "block_keys", "rows_dbk", "block_keys_dbk", "max_dbk_splits", "dbk_target_programs",
                     "min_dbk_tiles_per_split", "num_warps", "num_stages", "lane_keys", "max_lane_picks"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        _check(self.num_warps_dbk is None or self.num_warps_dbk >= 1,
               f"num_warps_dbk must be None or >= 1, got {self.num_warps_dbk}")
        for name in ("rows", "block_keys", "rows_dbk", "block_keys_dbk", "lane_keys"):
            value = getattr(self, name)
            _check(value & (value - 1) == 0, f"{name} must be a power of two, got {value}")


@dataclasses.dataclass(frozen=True)
class MosaicTiles:
    """Tiles of the Mosaic GPU compressed branch (`kernels.mosaic_compressed`), chosen on an H200
    (seed config, float32, T = 16384, 2026-12-02).

    block_q: query rows per compute warpgroup (wgmma's row group); block_kv: keys per step of the
    forward and dq kernels (forward with its transposes, ms: 32 -> 0.150, 64 -> 0.131, 96 -> 0.130);
    stages: shared-memory slots of the loads in flight (forward: 2 -> 0.131, 3 -> 0.135, 4 -> 0.134);
    dkv_chunk: queries per dk/dv program, partial sums added in XLA (dk/dv kernel: 512 -> 0.188,
    1024 -> 0.206, 2048 -> 0.262)."""

    block_q: int = 64
    block_kv: int = 64
    stages: int = 2
    dkv_chunk: int = 512

    def __post_init__(self):
        _check(self.block_q == 64, f"block_q must be 64 (one wgmma row group), got {self.block_q}")
        _check(self.block_kv % 32 == 0 and 32 <= self.block_kv <= 128,
               f"block_kv must be 32, 64, 96 or 128, got {self.block_kv}")
        _check(self.stages >= 2, f"stages must be >= 2, got {self.stages}")
        _check(self.dkv_chunk % 128 == 0 and self.dkv_chunk > 0,
               f"dkv_chunk must be a positive multiple of 128, got {self.dkv_chunk}")


SLIDING_IMPLS = ("auto", "pallas", "cudnn", "xla")
COMPRESSED_IMPLS = ("auto", "pallas", "mosaic", "cudnn", "xla")
COMPRESS_IMPLS = ("auto", "pallas", "xla")


@dataclasses.dataclass(frozen=True)
class KernelSettings:
    """All kernel settings of the Pallas backend."""

    selected: SelectedSettings = SelectedSettings()
    selection: SelectionSettings = SelectionSettings()
    flash: Tiles = Tiles()  # compressed attention and the Pallas sliding window
    sliding_impl: str = "auto"  # see kernels.sliding_window
    compressed_impl: str = "auto"  # see kernels.compressed_attention
    mosaic: MosaicTiles = MosaicTiles()  # the Mosaic GPU compressed branch (kernels.mosaic_compressed)
    # The grouped compress networks' input layers (`GroupedMLP.pair`, any backend): their contraction
    # as this many partial products summed after (a power of two). At the seed's B=4 T=512 XLA runs
    # each layer's [8 heads x 128 windows x 1024] x [1024 x 1024] product on 64 tiles, ~5x its
    # weights' bandwidth floor; splitting it did not help: the float32 train step (H200, 2026-12-01,
    # ms back to back) 5.18 (1) / 5.31 / 5.34 / 5.45 (2 / 4 / 8 splits), 5.18 / 5.30 / 5.33 / 5.44 in a
    # second round. Hence 1 (one matmul).
    compress_split_k: int = 1
    # The grouped compress networks' input layers in the train step (`GroupedMLP.pair` with its layer
    # stack at hand: `nsa_jax.stacking`): "xla" (einsums), "pallas" (`kernels.compress_matmul`: the
    # forward product with its bias and ReLU, and d(input), reading the layer's weights in their
    # stack in place), or "auto" (pallas on a GPU for float32 and at most
    # `kernels.compress_matmul.AUTO_MAX_ROWS` rows per head, where XLA's tiling leaves SMs idle).
    # Sizes the kernels' tiles do not divide, and batches split over devices outside `shard_map`,
    # take XLA's. The float32 train step (seed model, H200, 2026-12-02, ms back to back, xla ->
    # pallas): B=4 T=512 5.02 -> 4.87 and 5.03 -> 4.89 (128 rows per head); B=1 T=2048 5.52 -> 5.45
    # (128 rows); B=1 T=4096 8.38 -> 8.56 (256 rows: slower, hence the limit).
    compress_impl: str = "auto"
    compress_tiles: GroupedMatmulTiles = GroupedMatmulTiles()
    # The q / k / v projection (`SparseAttention.project`, any backend) from this many rows (batch x
    # tokens) on as three products on the joined weight's columns; below, one joined product sliced.
    # XLA copies each slice out and concatenates their gradients: 0.5 ms a step at B=1 T=16384, where
    # three products run 28.09 / 28.13 -> 27.62 ms back to back (peak memory 5.64 -> 5.42 GiB), against
    # 31 more kernels at B=4 T=512: 4.89 / 4.90 -> 5.03 / 5.04 ms (float32 train step, seed model,
    # H200, 2026-12-02). 0: always joined.
    split_qkv_from_rows: int = 8192

    def __post_init__(self):
        _check(self.split_qkv_from_rows >= 0, f"split_qkv_from_rows must be >= 0, got {self.split_qkv_from_rows}")
        _check(self.compress_impl in COMPRESS_IMPLS,
               f"compress_impl must be one of {', '.join(COMPRESS_IMPLS)}, got {self.compress_impl!r}")
        _check(self.compress_split_k >= 1 and self.compress_split_k & (self.compress_split_k - 1) == 0,
               f"compress_split_k must be a power of two, got {self.compress_split_k}")
        _check(self.sliding_impl in SLIDING_IMPLS,
               f"sliding_impl must be one of {', '.join(SLIDING_IMPLS)}, got {self.sliding_impl!r}")
        _check(self.compressed_impl in COMPRESSED_IMPLS,
               f"compressed_impl must be one of {', '.join(COMPRESSED_IMPLS)}, got {self.compressed_impl!r}")
