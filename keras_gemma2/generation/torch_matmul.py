"""Few-row float32 products of `TorchDecoder` on CPU, one slice per thread.

A decode step multiplies one row (one per sequence) by every weight matrix.
On CPU, torch hands such a product to MKL's matrix-vector kernel, which
runs on one core and, for some layouts, well below the memory bandwidth.
Measured on the project's 2-core machine, float32, mid config of
`benchmarks/generate.py`, medians of 100 calls:

| product | `x @ w` | as below |
|---|---|---|
| head `x @ table.T`, table `[32000, 512]` | 5.9 ms | 1.1-1.9 ms |
| `[1, 512] @ [512, 2048]` (gate, up) | 187-202 us | 110-138 us |
| `[1, 2048] @ [2048, 512]` (down) | 353 us | 184-189 us |

So the weights are cut into equal slices along their leading (contiguous)
axis, viewed, never copied, and multiplied by one `torch.bmm`, which runs
the slices on torch's threads:

- `product(x, w)`, `w [in, out]`: slices of the inner axis; their partial
  products are summed (the sum's order differs from one `x @ w`, so
  results differ from it by float32 rounding).
- `transposed_product(x, table)`, `table [out, in]` (the tied head): slices
  of the output axis, laid side by side: no sum, the same sums as
  `x @ table.T` up to the kernel's own order.

Only float32 CPU weights of at least `MIN_ELEMENTS` multiplied by at most
`MAX_ROWS` rows take these paths: bfloat16 products measured no faster
split, and many-row products (long prompts) are matrix-matrix products that MKL
already spreads over threads. Everything else is `x @ w`.

A layer kernel `[in, out]` streams slower than the same bytes laid out
`[out, in]`: one row times `[in, out]` runs MKL's column-update (axpy)
matrix-vector kernel, one row times `[out, in].T` its dot-product kernel.
Same machine, float32, 40 distinct matrices cycled so each streams from
memory, medians of 5 rounds:

| matrix | `[in, out]` sliced (`product`) | `[out, in]` sliced (`transposed_product`) |
|---|---|---|
| down `[2048, 512]` | 192 us (22 GB/s) | 115 us (36 GB/s) |
| gate, up `[512, 2048]` | 141 us (30 GB/s) | 102 us (41 GB/s) |

(A plain 2-thread sum over 160 MB ran at 50 GB/s.) So `TorchDecoder` keeps
an `[out, in]` copy of each float32 projection kernel (`Transposed`, from
`transposed_copies`); the kernels that multiply the same rows (query, key
and value; gate and up) share one stacked copy, one product
(`stacked_products`). The mid config's decode step, same process, the
two alternating: 8.7-10.0 ms per token without the copies, 6.7-7.8 ms
with them (three runs). The copies cost memory, as much again as those
kernels, and are made only while the model's copies total at most
`COPY_BYTES`. They are cached per variable across `generate` calls and
made again when a variable changes (`assign`, a training step).
"""

import contextlib
import functools
import math
import threading
import weakref

from keras_gemma2.generation import huge_pages
from keras_gemma2.layers.torch_ops import torch_module as _torch

# Above this many rows, `x @ w` is a matrix product that runs on all
# threads by itself.
MAX_ROWS = 8
# Smaller weights gain nothing from slicing. `[512, 256]` (key, value)
# measured the same either way with the weights in cache, and faster
# sliced inside the decode step, where they are not.
MIN_ELEMENTS = 2**17
# More slices than threads measured no faster (4 slices on 2 threads);
# past 16 each slice gets too thin to stream well.
MAX_SLICES = 16


# `TorchDecoder` keeps `[out, in]` copies of a model's float32 CPU
# projection kernels when they total at most this many bytes (0: never).
# The mid config's 8 layers: 120 MB; Gemma 2 2B in float32: 8 GB, over.
COPY_BYTES = 2**30

# `(id(variable tensor), ...) -> (their versions, stacked [out, in] copy)`,
# so a `generate` call reuses the copies of the one before. An entry leaves
# with any of its variables; a changed variable (a higher `_version`) is
# copied again.
_COPIES = {}

# `(kind, id(variable tensor), ...) -> (their versions, pack)`: see
# `cached_pack`.
_PACKS = {}

# `(id(weight), at_least) -> (threads, slices)`, so a decode step does not redo the
# weight's checks 57 times a token. An entry leaves with its weight.
_SLICES = {}


def _few_float32_rows(x):
    """Whether `x [..., in]` is at most `MAX_ROWS` float32 rows."""
    torch = _torch()
    return (
        x.dtype == torch.float32
        and x.dim() > 0
        and 0 < x.numel() // x.shape[-1] <= MAX_ROWS
    )


def _large_float32_matrix(w):
    """Whether `w` is a contiguous float32 CPU matrix worth slicing or copying."""
    torch = _torch()
    return (
        w.device.type == "cpu"
        and w.dtype == torch.float32
        and w.dim() == 2
        and w.numel() >= MIN_ELEMENTS
        and w.is_contiguous()
    )


def _sliced(x, w, at_least):
    """`w` viewed as `[slices, -1, columns]` to multiply `x` by, or `None`.

    `None`: multiply plainly (see the module docstring for when). Slices
    cut `w`'s leading axis, as many as torch has threads (at least
    `at_least`), a power of two that divides the axis.
    """
    torch = _torch()
    if not _few_float32_rows(x):
        return None
    threads = torch.get_num_threads()
    key = id(w), at_least
    known = _SLICES.get(key)
    if known is None or known[0] != threads:
        slices = 1
        if _large_float32_matrix(w):
            most = min(max(threads, at_least), MAX_SLICES)
            while slices * 2 <= most and w.shape[0] % (slices * 2) == 0:
                slices *= 2
        if known is None:
            weakref.finalize(w, _SLICES.pop, key, None)
        known = _SLICES[key] = (threads, slices)
    slices = known[1]
    return w.view(slices, -1, w.shape[1]) if slices > 1 else None


class Transposed:
    """A matrix `[in, out]` with its copy `table [out, in]`, for `product`.

    `product` multiplies few rows by `table` (`transposed_product`), many
    by `matrix` (a matrix-matrix product, as fast either way). `group`:
    `(stacked, sizes, members)` when `table` is rows of `stacked`, one
    copy of the matrices (`members`, in order) that multiply the same rows
    (query, key, value; gate, up), which `stacked_products` multiplies at
    once; else `None`.
    """

    __slots__ = ("matrix", "table", "group")

    def __init__(self, matrix, table, group=None):
        self.matrix = matrix
        self.table = table
        self.group = group

    @property
    def shape(self):
        return self.matrix.shape


def _cacheable(source):
    # An inference tensor has no version to tell a changed one by.
    return source is not None and not source.is_inference()


def transposed_copies(groups):
    """`groups` of matrices, each a `Transposed` where it gains from one.

    Args:
        groups: lists of `(matrix, source)` pairs: `matrix [in, out]` a
            view of the tensor `source` (a variable's own tensor, whose
            copy is cached), or `source=None` (never copied; nor is an
            inference tensor's, which keeps no version). The matrices
            of a group multiply the same rows; when every one of them is
            copied, their copies are stacked into one `[sum of outs, in]`
            table.

    Returns:
        The groups, in order: `Transposed` for the float32 CPU matrices of
        at least `MIN_ELEMENTS` that have a source, if their copies total
        at most `COPY_BYTES`; the other matrices as they came.
    """
    chosen = [
        [
            _cacheable(source) and _large_float32_matrix(matrix)
            for matrix, source in group
        ]
        for group in groups
    ]
    total = sum(
        matrix.numel() * matrix.element_size()
        for group, copies in zip(groups, chosen, strict=True)
        for (matrix, _), copy in zip(group, copies, strict=True)
        if copy
    )
    if total > COPY_BYTES:
        return [[matrix for matrix, _ in group] for group in groups]
    stacks = [
        len(group) > 1 and all(copies) and len({m.shape[0] for m, _ in group}) == 1
        for group, copies in zip(groups, chosen, strict=True)
    ]
    # What each copy holds: a stacked group's matrices, or one matrix.
    units = []
    for group, copies, stack in zip(groups, chosen, stacks, strict=True):
        kept = zip(group, copies, strict=True)
        pairs = [group] if stack else [[pair] for pair, copy in kept if copy]
        units += [tuple(zip(*pair, strict=True)) for pair in pairs]
    made = iter(_tables(units))
    results = []
    for group, copies, stack in zip(groups, chosen, stacks, strict=True):
        if stack:
            stacked = next(made)
            sizes = [matrix.shape[1] for matrix, _ in group]
            members = []
            shared = (stacked, sizes, members)
            members += [
                Transposed(matrix, table, shared)
                for (matrix, _), table in zip(group, stacked.split(sizes), strict=True)
            ]
            results.append(members)
            continue
        results.append(
            [
                Transposed(matrix, next(made)) if copy else matrix
                for (matrix, _), copy in zip(group, copies, strict=True)
            ]
        )
    return results


def _shape(matrices):
    """`[sum of outs, in]`: the shape of the stacked copy of `matrices`."""
    return (sum(matrix.shape[1] for matrix in matrices), matrices[0].shape[0])


def _tables(units):
    """The stacked `[out, in]` copy of each `(matrices, sources)` in `units`.

    Cached per `sources` while none of them changes; a changed one's copy
    is rewritten in place. The copies not cached yet are views of one new
    arena of huge pages (`huge_pages.empty`), 4 KiB-aligned, so that their
    streaming takes few TLB entries (mid config, one token: 7.43 -> 6.0 ms).
    """
    torch = _torch()
    keys = [tuple(id(source) for source in sources) for _, sources in units]
    tables = [None] * len(units)
    missing = []
    for index, ((matrices, sources), key) in enumerate(zip(units, keys, strict=True)):
        known = _COPIES.get(key)
        if known is not None and known[1].shape == _shape(matrices):
            tables[index] = known[1]
            if known[0] != tuple(source._version for source in sources):
                torch.cat([matrix.T for matrix in matrices], out=known[1])
        else:
            missing.append(index)
            for source in sources:
                weakref.finalize(source, _COPIES.pop, key, None)
    if missing:
        padded = [-(-math.prod(_shape(units[i][0])) // 1024) * 1024 for i in missing]
        dtype = units[missing[0]][0][0].dtype
        arena = huge_pages.empty((sum(padded),), dtype)
        begin = 0
        for index, size in zip(missing, padded, strict=True):
            matrices = units[index][0]
            shape = _shape(matrices)
            table = arena[begin : begin + math.prod(shape)].view(shape)
            torch.cat([matrix.T for matrix in matrices], out=table)
            tables[index] = table
            begin += size
    for (_, sources), key, table in zip(units, keys, tables, strict=True):
        _COPIES[key] = (tuple(source._version for source in sources), table)
    return tables


def stacked_products(x, matrices):
    """`[x @ m for m in matrices]` as one product, or `None`.

    One product when `matrices` are a whole `transposed_copies` group, in
    its order, and `x` has few rows (`product`'s rule for copies): the
    results are views of its output.
    """
    group = _whole_group(matrices)
    if group is None or _torch().compiler.is_compiling() or not _few_float32_rows(x):
        return None
    stacked, sizes = group
    return list(transposed_product(x, stacked).split_with_sizes(sizes, -1))


def _whole_group(matrices):
    """`(stacked, sizes)` if `matrices` are a whole `transposed_copies` group,
    in its order; else `None`."""
    first = matrices[0]
    if not isinstance(first, Transposed) or first.group is None:
        return None
    stacked, sizes, members = first.group
    if len(matrices) != len(members) or any(
        m is not member for m, member in zip(matrices, members, strict=True)
    ):
        return None
    return stacked, sizes


def _sliced_product(sliced, rows):
    """`rows [M, in] @ table.T` for `sliced`, a table `[out, in]` viewed as
    `[S, out/S, in]`: `[M, out]`, the slices' outputs side by side."""
    torch = _torch()
    slices, part, inner = sliced.shape
    # `rows.T` keeps a leading dimension of `inner` (strides `(1, in)`); one
    # row as `view(1, in, 1)` would not, and `bmm` then ran 4x slower.
    parts = torch.bmm(sliced, rows.T.expand(slices, inner, rows.shape[0]))
    if rows.shape[0] == 1:  # one decode row: `[S, out/S, 1]` is `[1, out]`
        return parts.view(1, slices * part)
    return parts.permute(2, 0, 1).reshape(rows.shape[0], slices * part)


class SideBySide:
    """A group's few-row product: calling it on rows `x [M, in]` gives
    `[M, sum of outs]`, the group's products side by side (`sizes` wide);
    `split` gives them one `[M, out]` view per matrix. The base of
    `RowProduct` here, `torch_int8.RowProduct` and
    `torch_half.HalfRowProduct`, which `TorchDecoder` calls alike."""

    __slots__ = ()

    def split(self, x):
        """The products of `x [M, in]`, one `[M, out]` view per matrix."""
        products = self(x)
        if len(self.sizes) == 1:
            return [products]
        # `split_with_sizes`, not `split`: the latter is a Python wrapper
        # around it (about 5 us a call).
        return products.split_with_sizes(self.sizes, -1)


@functools.cache
def quantized_op(name):
    """The default overload of `torch.ops.quantized.<name>`, looked up once:
    calling the op's packet checks every call's arguments for script
    objects (about 2 us)."""
    return getattr(_torch().ops.quantized, name).default


# FBGEMM's packs inside a compiled step (`TorchDecoder`, `jit_compile=True`).
# A pack is a TorchScript object, which `torch.compile` cannot pass to an op:
# the graph broke at each of the mid config's 19 packed products. The step
# reaches a pack through this package's own op instead,
# `keras_gemma2::fbgemm_product(rows, slot, kind, width)`: `slot` numbers
# the packs its decoder lends for the call (`lent`), so one program serves
# every decoder of the model's shapes, and inductor calls the op as an
# opaque kernel. The kinds: float16 packs (`torch_half`), int8 packs with
# Keras' codes (`torch_int8`).
HALF, INT8 = 0, 1
_LENT = threading.local()


def _fbgemm_direct(kind, rows, pack):
    if kind == HALF:
        return quantized_op("linear_dynamic_fp16")(rows, pack)
    # Codes shifted by the zero point 128 into FBGEMM's uint8, scale 1.
    op = quantized_op("linear_with_input_q_dq_qweight_dq_output_fp32")
    return op(rows, 1.0, 128, pack)


@functools.cache
def register_fbgemm_op():
    """Define `keras_gemma2::fbgemm_product` in torch, once per process.

    Called before anything compiles (`TorchDecoder.__init__`), never while
    tracing. Returns the library, which must stay alive with the op.
    """
    torch = _torch()
    library = torch.library.Library("keras_gemma2", "DEF")
    library.define(
        "fbgemm_product(Tensor rows, int slot, int kind, int width) -> Tensor"
    )

    def lent_product(rows, slot, kind, width):
        return _fbgemm_direct(kind, rows, _LENT.packs[slot])

    def shape_only(rows, slot, kind, width):
        return rows.new_empty((rows.shape[0], width), dtype=torch.float32)

    library.impl("fbgemm_product", lent_product, "CPU")
    torch.library.register_fake("keras_gemma2::fbgemm_product", shape_only, lib=library)
    return library


def fbgemm_product(kind, rows, pack, slot=None, width=None):
    """FBGEMM's float32 `rows [M, in] @ pack.T`, `[M, width]`.

    `rows` float32: rounded to float16 for a `HALF` pack, to uint8 codes
    (`x + 128`) for an `INT8` one. Eagerly, the pack's op; while
    `torch.compile` traces a step and the pack has a `slot` among those
    lent (`lent`), `keras_gemma2::fbgemm_product`, which calls the same.
    """
    if slot is not None and _torch().compiler.is_compiling():
        return _torch().ops.keras_gemma2.fbgemm_product(rows, slot, kind, width)
    return _fbgemm_direct(kind, rows, pack)


def number_packs(holders):
    """Give each `(holder, pack)` with a pack its `holder.slot`; the packs.

    The packs, in slot order, are what the decoder lends (`lent`) while its
    compiled step runs. Registers the op first (`register_fbgemm_op`).
    """
    packs = []
    for holder, pack in holders:
        if pack is not None:
            holder.slot = len(packs)
            packs.append(pack)
    if packs:
        register_fbgemm_op()
    return packs


@contextlib.contextmanager
def lent(packs):
    """While open, `keras_gemma2::fbgemm_product` in this thread multiplies
    by `packs[slot]` (see `number_packs`)."""
    _LENT.packs = packs
    try:
        yield
    finally:
        _LENT.packs = ()


class RowProduct(SideBySide):
    """`x @ m` for each of `matrices`, set up once for a decode loop.

    A decode step multiplies a few rows by every projection; through
    `stacked_products` each product first re-checks its matrices and looks
    up their slices (mid config: about 0.3 ms of a 7.5 ms token). This is
    the same product (the same sliced view, the same `bmm`) with the checks
    done once: `row_product` builds it for a whole stacked group (or one
    `Transposed`, or the tied head's `[out, in]` table) whose `[out, in]`
    table is sliced; calling it on rows that `takes` gives the products
    laid side by side, `[M, sum of outs]`, equal to `stacked_products`' (or
    `transposed_product`'s) bit for bit.
    """

    __slots__ = ("sliced", "sizes")

    def __init__(self, sliced, sizes):
        self.sliced = sliced  # [slices, out / slices, in], a view
        self.sizes = sizes

    @staticmethod
    def takes(x):
        """Whether `x` is `[M, in]`, few float32 rows (`MAX_ROWS`)."""
        return x.dim() == 2 and _few_float32_rows(x)

    def __call__(self, x):
        """`[M, sum of outs]`: `x [M, in]`'s products, side by side."""
        return _sliced_product(self.sliced, x)


def row_product(matrices):
    """A `RowProduct` for `matrices`, or `None` where none applies.

    `matrices`: a whole `transposed_copies` group in its order, one
    `Transposed`, or one float32 CPU table `[out, in]` (the tied head,
    multiplied as `transposed_product` does). `None`: the rows go through
    `stacked_products` / `product` (int8, bfloat16 and LoRA-merged
    kernels, copies not made, and a table too small to slice).
    """
    first = matrices[0]
    group = _whole_group(matrices)
    if group is not None:
        table, sizes = group
    elif len(matrices) != 1 or (isinstance(first, Transposed) and first.group):
        return None  # part of a group, or several matrices not stacked
    elif isinstance(first, Transposed):
        table, sizes = first.table, [first.table.shape[0]]
    elif _torch().is_tensor(first):
        table, sizes = first, [first.shape[0]]
    else:
        return None
    # One float32 row stands for any few: `_sliced`'s choice of slices
    # depends on the thread count and the table alone.
    row = _torch().zeros((1, table.shape[1]), dtype=table.dtype, device=table.device)
    sliced = _sliced(row, table, at_least=2)
    return None if sliced is None else RowProduct(sliced, sizes)


def clear_copies():
    """Free every cached copy and pack (`cached_pack`); the next `generate`
    call makes them again."""
    _COPIES.clear()
    _PACKS.clear()


def fbgemm_engine():
    """Whether torch's quantized engine is FBGEMM's here (x86 with AVX2;
    `supported_engines` lists it only where the CPU runs it)."""
    engines = _torch().backends.quantized
    return engines.engine in ("x86", "fbgemm") and "fbgemm" in engines.supported_engines


def within_copy_limit(groups, packable, size):
    """The indices of the groups to pack: those whose every member is
    `packable`, while their packs (`size(member)` bytes each) total at
    most `COPY_BYTES`; none past it."""
    chosen = [
        index
        for index, group in enumerate(groups)
        if all(packable(member) for member in group)
    ]
    total = sum(size(member) for index in chosen for member in groups[index])
    return chosen if total <= COPY_BYTES else []


def cached_pack(kind, sources, make):
    """`make()`'s pack of the variable tensors `sources`, cached.

    Kept across `generate` calls under `kind` and the sources; made again
    when one of them changes (a higher `_version`); an entry leaves with
    any of its sources. For the packed copies that FBGEMM multiplies
    (`torch_int8.packed_products`, `torch_half.half_products`).
    """
    torch = _torch()
    key = (kind,) + tuple(id(source) for source in sources)
    versions = tuple(source._version for source in sources)
    known = _PACKS.get(key)
    if known is None or known[0] != versions:
        if known is None:
            for source in sources:
                weakref.finalize(source, _PACKS.pop, key, None)
        with torch.inference_mode():
            known = (versions, make())
        _PACKS[key] = known
    return known[1]


def product(x, w):
    """`x [..., in] @ w [in, out]`, the inner axis split over threads.

    `w` may be a `Transposed`: few rows then multiply its `[out, in]` copy.
    """
    torch = _torch()
    if torch.compiler.is_compiling():  # inductor picks its own kernels
        return x @ (w.matrix if isinstance(w, Transposed) else w)
    if isinstance(w, Transposed):
        if _few_float32_rows(x):
            return transposed_product(x, w.table)
        return x @ w.matrix
    # One thread gains nothing from splitting a projection.
    sliced = _sliced(x, w, at_least=1)
    if sliced is None:
        return x @ w
    slices = sliced.shape[0]
    if x.dim() == 2 and x.shape[0] == 1:  # one decode row: [S, 1, in/S]
        return torch.bmm(x.view(slices, 1, -1), sliced).sum(0)
    rows = x.reshape(-1, x.shape[-1])
    parts = torch.bmm(
        rows.view(rows.shape[0], slices, -1).transpose(0, 1),  # [S, M, in/S]
        sliced,  # [S, in/S, out]
    )
    return parts.sum(0).reshape(*x.shape[:-1], w.shape[1])


def transposed_product(x, table):
    """`x [..., in] @ table.T` for `table [out, in]`, output rows split.

    Split even on one thread: the batched kernel alone measured 2.4x
    faster than `x @ table.T` there (the head, 1 thread: 2.5 vs 5.9 ms).
    """
    torch = _torch()
    if torch.compiler.is_compiling():
        return x @ table.T
    sliced = _sliced(x, table, at_least=2)
    if sliced is None:
        return x @ table.T
    if x.dim() == 2:
        return _sliced_product(sliced, x)
    product = _sliced_product(sliced, x.reshape(-1, x.shape[-1]))
    return product.reshape(*x.shape[:-1], table.shape[0])
