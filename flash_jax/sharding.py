"""Running the attention backends on sharded inputs, through JAX's own runtime.

A Pallas kernel is one opaque ``pallas_call``: XLA's SPMD partitioner cannot
look inside it, so it would all-gather sharded operands and run the whole
problem on every device. Attention is independent across batch rows and
across heads, so this module runs the backend once per (batch, head) shard
instead, by the context the call is traced in:

* inside ``jax.shard_map`` over all mesh axes (or ``pmap``): the backend
  runs on the local shard. With ``check_vma=True`` every operand is first
  made to vary over the union of the manual axes the operands vary over
  (the kernels declare that union on their outputs, see `varying_like`),
  and each gradient is summed over the axes its primal does not vary over,
  as JAX's transpose of that implicit ``pvary`` would;
* under ``jit`` with operands sharded over ``Explicit`` mesh axes (the
  default of ``jax.make_mesh``): an internal ``jax.shard_map`` over that
  mesh, with the results resharded to the caller's layout;
* otherwise (``Auto`` axes, or no mesh), where several devices are
  present: a ``jax.experimental.custom_partitioning`` op whose partition
  callback picks the per-shard layout when XLA partitions the program (on
  one device it lowers to the plain backend call; under ``vmap`` the plain
  backend runs, vmapped, as custom_partitioning has no batching rule).
  With one device, or lowering for an abstract mesh (ahead of time), the
  plain backend call; inside a ``shard_map`` over only some axes of an
  ``Auto`` mesh, the backend on the manual shard (XLA gathers the others).

Only the batch dim and the head dims are split. The batch axes come from the
query's batch dim and the head axes from its head dim (the key's where the
query is not split); a split that does not divide ``B``, or the kv heads
``K`` (so a GQA group never straddles two devices), is dropped, except that
with one kv head (MQA) the query heads split alone and every shard keeps
that head. Everything
else is replicated: sequence-sharded inputs are all-gathered (still exact;
sequence parallelism would need ring attention), and so is every batch and
head split under ``mask_fn`` or per-element dropout, which see absolute
batch and head indices. A bias or mask with a broadcast (size-1) batch or
head dim stays whole along it, and the bias gradient is summed across the
shards.

Backends of plain XLA ops (``"xla"``) are left to XLA's partitioner, except
with Explicit axes, where sharding in types rejects a sequence split.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import numpy as np
from jax import lax
from jax._src import config as _jax_config
from jax._src import mesh as _mesh_lib
from jax.experimental.custom_partitioning import (ArrayMapping,
                                                  CompoundFactor,
                                                  SdyShardingRule,
                                                  custom_partitioning)
from jax.extend import core as _ext_core
from jax.interpreters import batching as _batching
from jax.interpreters import mlir as _mlir
from jax.sharding import NamedSharding, PartitionSpec as P

from flash_jax import backends
from flash_jax.config import AttentionConfig
from flash_jax.masks import MaskArrays

# Backends whose ops XLA partitions by itself (no opaque kernel).
SELF_PARTITIONING = frozenset({"xla"})

# The logical dims of each operand, one letter per array dim: b batch,
# n query heads, k kv heads (split with the same mesh axes as n, unless
# there is one kv head, which every head shard keeps), t / s
# query / key positions, h / v head dims, r anything else. Only b, n and k
# are ever split.
_OPERAND_DIMS = {
    "query": "btnh", "key": "bskh", "value": "bskv", "bias": "bnts",
    "out": "btnv", "lse": "bnt", "dout": "btnv", "dlse": "bnt",
}
_ARRAY_DIMS = {
    "q_lengths": "b", "kv_lengths": "b", "mask": "bnts",
    "q_segment_ids": "bt", "kv_segment_ids": "bs", "dropout_seed": "r",
}
_FORWARD_INPUTS = ("query", "key", "value", "bias", "arrays")
_BACKWARD_INPUTS = _FORWARD_INPUTS + ("out", "lse", "dout", "dlse")
# What each result has the dims (and, for a gradient, the vma) of.
_RESULTS = {"forward": ("out", "lse"),
            "backward": ("query", "key", "value", "bias")}


# ----------------------------------------------------------------- vma ----


def _varying(x) -> frozenset:
  """The manual mesh axes ``x`` varies over (empty outside shard_map)."""
  mat = getattr(jax.typeof(x), "manual_axis_type", None)
  return frozenset() if mat is None else frozenset(mat.varying)


def _union_varying(tree) -> frozenset:
  return frozenset().union(*(_varying(x) for x in jax.tree.leaves(tree)))


def varying_like(structs, *inputs):
  """``structs`` (a pytree of `jax.ShapeDtypeStruct`) marked as varying over
  every manual mesh axis any of ``inputs`` varies over.

  For a ``pallas_call``'s ``out_shape``: inside ``jax.shard_map`` with
  ``check_vma=True`` Pallas needs each output's varying axes, and an output
  depends on every input. Outside shard_map the mark is ignored.
  """
  mat = jax.sharding.ManualAxisType(varying=_union_varying(inputs))
  return jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, manual_axis_type=mat),
      structs)


def _vary(x, axes: frozenset):
  """``x`` made varying over ``axes`` (a superset of its own)."""
  missing = tuple(sorted(axes - _varying(x)))
  return lax.pcast(x, missing, to="varying") if missing else x


# ------------------------------------- Pallas interpret mode under vma ----
# Pallas traces a kernel with the vma check off, but its HLO interpreter
# (interpret mode) evaluates that kernel with the check of the enclosing
# shard_map still on, and fails on the first op mixing a varying operand
# with a constant (JAX 0.11.2). This call boundary lowers its body with the
# check off, as Pallas traces it; its result types were checked when it was
# traced. Used only for interpret mode inside a check_vma shard_map.

_interpret_call_p = _ext_core.Primitive("flash_jax_interpret_call")
_interpret_call_p.multiple_results = True


def _interpret_call(fn, *args):
  """``fn(*args)`` (flat arrays in, a flat list out) under the boundary."""
  closed = jax.make_jaxpr(fn)(*args)
  return _interpret_call_p.bind(*args, jaxpr=closed)


def _interpret_abstract_eval(*avals, jaxpr):
  del avals
  return jaxpr.out_avals, jaxpr.effects


def _unvarying(aval):
  return aval.update(manual_axis_type=jax.sharding.ManualAxisType())


def _interpret_lowering(ctx, *args, jaxpr):
  ctx = ctx.replace(avals_in=[_unvarying(a) for a in ctx.avals_in],
                    avals_out=[_unvarying(a) for a in ctx.avals_out])
  with _jax_config._check_vma(False):
    return _mlir.lower_fun(_ext_core.jaxpr_as_fun(jaxpr),
                           multiple_results=True)(ctx, *args)


def _interpret_batching(args, dims, *, jaxpr):
  # An unbatched operand has dim None, as vmap's in_axes take it.
  fn = jax.vmap(_ext_core.jaxpr_as_fun(jaxpr), in_axes=list(dims))
  outs = _interpret_call(lambda *a: list(fn(*a)), *args)
  return outs, [0] * len(outs)


_interpret_call_p.def_effectful_abstract_eval(_interpret_abstract_eval)
_interpret_call_p.def_impl(
    lambda *args, jaxpr: _ext_core.jaxpr_as_fun(jaxpr)(*args))
_mlir.register_lowering(_interpret_call_p, _interpret_lowering)
_batching.primitive_batchers[_interpret_call_p] = _interpret_batching


# --------------------------------------------------------------- layout ----


def _axes(entry) -> tuple[str, ...]:
  """A PartitionSpec entry as a tuple of mesh axis names."""
  if entry is None or entry is P.UNCONSTRAINED:
    return ()
  return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _entry(axes: tuple[str, ...]):
  return None if not axes else axes[0] if len(axes) == 1 else axes


@dataclasses.dataclass(frozen=True)
class Layout:
  """Which mesh axes split the batch and the heads of one attention call."""

  batch: tuple[str, ...] = ()
  heads: tuple[str, ...] = ()

  @property
  def axes(self) -> frozenset:
    """Every mesh axis the call is split over."""
    return frozenset(self.batch + self.heads)

  def spec(self, dims: str, shape, full: dict[str, int]) -> P:
    """The PartitionSpec of an operand with logical ``dims`` and ``shape``.

    A dim is split only where it has its full size: a broadcast (size-1)
    batch or head dim of a bias or mask stays whole. With one kv head (MQA)
    a head split divides the query heads and every shard keeps that head.
    """
    split = {"b": self.batch, "n": self.heads,
             "k": self.heads if full["k"] > 1 else ()}
    return P(*(_entry(split.get(d, ())) if size == full.get(d) else None
               for d, size in zip(dims, shape)))


def _splittable(config: AttentionConfig, operands: dict) -> bool:
  """False where a per-shard run would change the result."""
  # mask_fn and dropout see absolute batch and head indices.
  if config.mask.mask_fn is not None:
    return False
  if config.dropout_rate > 0 and not config.dropout_broadcast:
    return False
  arrays = operands["arrays"]
  # A mask array this module does not know the dims of: do not guess.
  return all(getattr(arrays, f.name) is None or f.name in _ARRAY_DIMS
             for f in dataclasses.fields(arrays))


def _choose_layout(shapes: dict, specs: dict,
                   axis_sizes: dict[str, int]) -> Layout:
  """The split of one call given its operands' current PartitionSpecs.

  ``shapes`` and ``specs`` map ``"query"`` and ``"key"`` to their shape and
  PartitionSpec (None if unknown); ``axis_sizes`` gives the usable mesh axes.
  """
  batch, _, num_heads, _ = shapes["query"]
  num_kv_heads = shapes["key"][2]

  def axes_of(dim: int) -> list[tuple[str, ...]]:
    found = []
    for name in ("query", "key"):
      spec = specs.get(name)
      if spec is not None and dim < len(spec):
        axes = _axes(spec[dim])
        if axes and all(a in axis_sizes for a in axes):
          found.append(axes)
    return found

  def divides(axes, n: int) -> bool:
    return n % math.prod(axis_sizes[a] for a in axes) == 0

  batch_axes = next((a for a in axes_of(0) if divides(a, batch)), ())
  # Heads split along whole GQA groups (the kv heads split too), or, with a
  # single kv head, along the query heads alone.
  head_axes = next((a for a in axes_of(2)
                    if (num_kv_heads == 1 or divides(a, num_kv_heads))
                    and divides(a, num_heads)
                    and not set(a) & set(batch_axes)), ())
  return Layout(batch_axes, head_axes)


def _full_sizes(operands: dict) -> dict[str, int]:
  batch, q_seq, num_heads, _ = operands["query"].shape
  _, kv_seq, num_kv_heads, _ = operands["key"].shape
  return {"b": batch, "t": q_seq, "s": kv_seq, "n": num_heads,
          "k": num_kv_heads}


def _dims_tree(operands: dict) -> dict:
  """The logical dims of every operand, in the operands' tree structure."""
  dims = {}
  for name, value in operands.items():
    if name == "arrays":
      dims[name] = dataclasses.replace(value, **{
          f.name: _ARRAY_DIMS.get(f.name, "?")
          for f in dataclasses.fields(value)
          if getattr(value, f.name) is not None})
    elif value is not None:
      dims[name] = _OPERAND_DIMS[name]
    else:
      dims[name] = None
  return dims


def _specs(layout: Layout, operands: dict, full: dict) -> dict:
  """The PartitionSpec of every operand under ``layout``."""
  return jax.tree.map(lambda dims, x: layout.spec(dims, x.shape, full),
                      _dims_tree(operands), operands)


def _result_shapes(kind: str, operands: dict) -> dict[str, tuple]:
  """The shapes of the call's results that are not None, by name."""
  if kind == "forward":
    batch, q_seq, num_heads, _ = operands["query"].shape
    return {"out": (batch, q_seq, num_heads, operands["value"].shape[-1]),
            "lse": (batch, num_heads, q_seq)}
  return {n: operands[n].shape for n in _RESULTS[kind]
          if operands[n] is not None}


def _result_specs(layout: Layout, kind: str, operands: dict, full: dict):
  """The PartitionSpec of each result (None for a None result)."""
  shapes = _result_shapes(kind, operands)
  return tuple(
      layout.spec(_OPERAND_DIMS[n], shapes[n], full) if n in shapes else None
      for n in _RESULTS[kind])


# ------------------------------------------------------------ local run ----


def _run_backend(kind: str, config: AttentionConfig, operands: dict):
  backend = backends.get(config.implementation)
  if kind == "forward":
    return backend.forward(config, *(operands[n] for n in _FORWARD_INPUTS))
  return backend.backward(config, *(operands[n] for n in _BACKWARD_INPUTS))


def _run_local(kind: str, config: AttentionConfig, operands: dict,
               reduce_axes: dict[str, tuple[str, ...]] | None = None):
  """Runs the backend on this device's shard.

  Under ``check_vma`` every operand is first made to vary over the union of
  the operands' varying axes (so the backend's helper ops and kernels see
  one vma), and each gradient is summed over the axes its primal, as the
  caller passed it, does not vary over: the transpose of that implicit
  ``pvary``. Without vma, ``reduce_axes`` names per primal the mesh axes to
  sum its gradient over.
  """
  primals = {n: operands[n] for n in _RESULTS["backward"]}
  union = _union_varying(operands)
  if union:
    operands = jax.tree.map(functools.partial(_vary, axes=union), operands)
  if union and config.interpret:
    flat, tree = jax.tree.flatten(operands)
    run = lambda *flat: jax.tree.leaves(
        _run_backend(kind, config, jax.tree.unflatten(tree, flat)))
    outs = iter(_interpret_call(run, *flat))
    results = tuple(None if kind == "backward" and operands[n] is None
                    else next(outs) for n in _RESULTS[kind])
  else:
    results = _run_backend(kind, config, operands)
  if union:
    # Pallas' Triton outputs carry the union (`varying_like`); Mosaic GPU
    # kernels' do not, and custom_vjp requires each gradient to vary like
    # its primal, so the mark is restored here for every backend.
    results = tuple(None if r is None else _vary(r, union) for r in results)
  if kind == "forward":
    return results
  grads = []
  for name, grad in zip(_RESULTS["backward"], results):
    if grad is not None:
      axes = (union - _varying(primals[name]) if union
              else (reduce_axes or {}).get(name, ()))
      if axes:
        grad = lax.psum(grad, tuple(sorted(axes)))
    grads.append(grad)
  return tuple(grads)


# -------------------------------------------------------- explicit mesh ----


def _explicit_mesh(operands: dict):
  """The mesh of the operands' Explicit-axis shardings, or None."""
  for x in jax.tree.leaves(operands):
    sharding = jax.typeof(x).sharding
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty:
      continue
    explicit = set(mesh.explicit_axes)
    if any(set(_axes(e)) & explicit for e in sharding.spec):
      return mesh
  return None


def _spec_or_none(x):
  spec = getattr(jax.typeof(x).sharding, "spec", None)
  return None if spec is None else P(*spec)


def _run_shard_map(kind: str, config: AttentionConfig, operands: dict, mesh):
  """Runs the call per shard under an internal shard_map over ``mesh``."""
  full = _full_sizes(operands)
  layout = Layout()
  if _splittable(config, operands):
    layout = _choose_layout(
        {n: operands[n].shape for n in ("query", "key")},
        {n: _spec_or_none(operands[n]) for n in ("query", "key")},
        dict(zip(mesh.axis_names, mesh.axis_sizes)))
  specs = _specs(layout, operands, full)
  # shard_map takes inputs laid out as its in_specs: reshard first (a no-op
  # where they already are; an all-gather of a sequence split).
  resharded = jax.tree.map(
      lambda x, s: jax.sharding.reshard(x, NamedSharding(mesh, s)),
      operands, specs)
  out_specs = _result_specs(layout, kind, operands, full)
  home = _home_specs(kind, operands)

  def local(operands):
    return _run_local(kind, config, operands)

  results = jax.shard_map(local, mesh=mesh, in_specs=(specs,),
                          out_specs=out_specs)(resharded)
  # Results go back to the caller's layout (a gradient must have its
  # primal's type): out and lse follow the query, gradients their primal.
  return tuple(r if r is None else jax.sharding.reshard(
      r, NamedSharding(mesh, s)) for r, s in zip(results, home))


def _home_specs(kind: str, operands: dict):
  """The caller-side PartitionSpec of each result."""
  if kind == "backward":
    return tuple(None if operands[n] is None else _spec_or_none(operands[n])
                 for n in _RESULTS[kind])
  q = tuple(_spec_or_none(operands["query"]) or ()) + (None,) * 4
  return P(q[0], q[1], q[2], None), P(q[0], q[2], q[1])


# ------------------------------------------------- custom partitioning ----


def _sharding_rule(operand_dims, operand_shapes, result_dims, result_shapes,
                   full: dict[str, int], splittable: bool) -> SdyShardingRule:
  """The op's Shardy rule: b, n and k pass through, all else is replicated.

  Query heads are the compound factor (k g) of kv heads and the GQA group,
  so a head split lands on whole groups; with one kv head (MQA) they are
  the factor g alone (Shardy rejects a size-1 part of a compound factor).
  A broadcast (size-1) dim gets a factor of its own.
  """
  groups = full["n"] // full["k"]
  compound = groups > 1 and full["k"] > 1
  names = {"b": "b", "t": "t", "s": "s", "k": "k", "h": "h", "v": "v",
           "n": (CompoundFactor("k", "g") if compound
                 else "g" if groups > 1 else "k")}
  fresh = (f"x{i}" for i in range(1 << 30))

  def mapping(dims, shape):
    return ArrayMapping(*(
        names[d] if d in names and size == full.get(d, size) else next(fresh)
        for d, size in zip(dims, shape)))

  operands = tuple(map(mapping, operand_dims, operand_shapes))
  results = tuple(map(mapping, result_dims, result_shapes))
  # Factors in order of first use: Shardy wants special factors sorted so.
  used = list(dict.fromkeys(
      f for m in operands + results for d in m
      for f in (d if isinstance(d, CompoundFactor) else (d,))))
  replicate = ("t", "s", "h", "v") + (() if splittable else ("b", "k", "g"))
  return SdyShardingRule(
      operands, results,
      need_replication_factors=tuple(f for f in used if f in replicate),
      **({"g": groups} if compound else {}))


def _run_partitioned(kind: str, config: AttentionConfig, operands: dict):
  """The call as a custom_partitioning op (Auto axes, or no mesh)."""
  flat, tree = jax.tree.flatten(operands)
  full = _full_sizes(operands)
  splittable = _splittable(config, operands)
  flat_dims = jax.tree.leaves(_dims_tree(operands))
  result_names = _RESULTS[kind]
  result_shapes = _result_shapes(kind, operands)
  present = list(result_shapes)   # the op's results: no Nones

  def plain(*flat):
    return _run_local(kind, config, jax.tree.unflatten(tree, flat))

  def layout_for(mesh, arg_shapes) -> Layout:
    if not splittable or mesh.empty:
      return Layout()
    shardings = jax.tree.unflatten(tree, [a.sharding for a in arg_shapes])
    specs = {n: getattr(shardings[n], "spec", None) for n in ("query", "key")}
    return _choose_layout({n: operands[n].shape for n in ("query", "key")},
                          specs, dict(mesh.shape))

  def shardings_for(mesh, layout: Layout, arg_shapes):
    if mesh.empty:
      # No named mesh to describe shards with: keep everything replicated.
      devices = sorted(arg_shapes[0].sharding.device_set, key=lambda d: d.id)
      replicated = NamedSharding(
          jax.sharding.Mesh(np.array(devices), ("replica",)), P())
      return ((replicated,) * len(arg_shapes),
              tuple(replicated for _ in present))
    specs = _specs(layout, operands, full)
    args = tuple(NamedSharding(mesh, s) for s in jax.tree.leaves(
        specs, is_leaf=lambda x: isinstance(x, P)))
    results = tuple(
        NamedSharding(mesh, s)
        for s in _result_specs(layout, kind, operands, full) if s is not None)
    return args, results

  def partition(mesh, arg_shapes, result_shape):
    del result_shape
    layout = layout_for(mesh, arg_shapes)
    arg_shardings, result_shardings = shardings_for(mesh, layout, arg_shapes)
    # A gradient is summed over the split axes its primal is not split
    # over (a bias broadcast over the batch, k and v shared by all heads).
    specs = _specs(layout, operands, full)
    reduce_axes = {
        name: tuple(layout.axes - {a for e in specs[name] for a in _axes(e)})
        for name in _RESULTS["backward"] if operands.get(name) is not None}

    def lower_fn(*flat):
      result = _run_local(kind, config, jax.tree.unflatten(tree, flat),
                          reduce_axes)
      return tuple(r for r in result if r is not None)

    return mesh, lower_fn, result_shardings, arg_shardings

  def infer(mesh, arg_shapes, result_shape):
    del result_shape
    _, results = shardings_for(mesh, layout_for(mesh, arg_shapes), arg_shapes)
    return results

  def flat_plain(*flat):
    return tuple(r for r in plain(*flat) if r is not None)

  op = custom_partitioning(flat_plain)
  op.def_partition(
      partition=partition, infer_sharding_from_operands=infer,
      sharding_rule=_sharding_rule(
          flat_dims, [x.shape for x in flat],
          [_OPERAND_DIMS[n] for n in present], list(result_shapes.values()),
          full, splittable))

  # custom_partitioning has no batching rule: under vmap, run the plain
  # backend (vmapped as it always is) instead.
  batched = jax.custom_batching.custom_vmap(lambda *flat: op(*flat))

  @batched.def_vmap
  def _(axis_size, in_batched, *flat):
    del axis_size
    out = jax.vmap(flat_plain, in_axes=[0 if b else None for b in in_batched])(
        *flat)
    return out, tuple(True for _ in out)

  results = dict(zip(present, batched(*flat)))
  return tuple(results.get(n) for n in result_names)


# ---------------------------------------------------------------- entry ----


def _manual_axes() -> tuple[bool, bool]:
  """Whether some, and whether all, axes of the current mesh are manual."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return False, False
  return bool(mesh.manual_axes), mesh.are_all_axes_manual


def _may_partition() -> bool:
  """Whether XLA may split this call over several real devices.

  custom_partitioning is left out where it cannot help, and where it
  cannot lower: lowering for an abstract mesh (ahead of time, without
  devices) rejects it.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return jax.device_count() > 1
  return mesh.size > 1 and not _mesh_lib.get_concrete_mesh().empty


def _dispatch(kind: str, config: AttentionConfig, operands: dict):
  plain_xla = config.implementation in SELF_PARTITIONING
  some_manual, all_manual = _manual_axes()
  if all_manual:
    if plain_xla:
      return _run_backend(kind, config, operands)
    return _run_local(kind, config, operands)
  mesh = _explicit_mesh(operands)
  if mesh is not None:
    # Even XLA ops need this: sharding in types rejects a sequence split.
    return _run_shard_map(kind, config, operands, mesh)
  if plain_xla:
    return _run_backend(kind, config, operands)
  if some_manual or not _may_partition():
    # Inside a shard_map over some axes of an Auto mesh, run on the manual
    # shard: XLA gathers the other axes around the kernel (there
    # custom_partitioning gets no named mesh).
    return _run_local(kind, config, operands)
  return _run_partitioned(kind, config, operands)


def forward(config: AttentionConfig, query, key, value, bias,
            arrays: MaskArrays):
  """The backend's forward, run per batch/head shard: ``(out, lse)``."""
  return _dispatch("forward", config, dict(
      query=query, key=key, value=value, bias=bias, arrays=arrays))


def backward(config: AttentionConfig, query, key, value, bias,
             arrays: MaskArrays, out, lse, dout, dlse):
  """The backend's backward, run per batch/head shard: ``(dq, dk, dv,
  dbias)``, each with its primal's sharding (and vma)."""
  return _dispatch("backward", config, dict(
      query=query, key=key, value=value, bias=bias, arrays=arrays, out=out,
      lse=lse, dout=dout, dlse=dlse))
