"""Verify an uploaded program before anything runs it.

A TorchScript archive or a torch.export program is code: ``torch.jit.load`` runs a
scripted ``__setstate__`` while it loads, and any op in ``forward`` runs on every
request. ``aten::from_file`` alone is an arbitrary file write. So an uploaded
program is admitted only when every op it can call is a pure tensor op:

* TorchScript, before ``torch.jit.load``: the zip must have unique entry names,
  its pickles may only reference torch's own tensor-rebuilding globals and
  scripted classes, and its code may define no ``__setstate__``/``__getstate__``.
* TorchScript, after loading and before any call: every method of every
  submodule, with calls inlined, may only contain allowed nodes (see ``op_refusal``).
* torch.export: every graph node (including nested graphs) must call an allowed
  ATen op overload, a higher-order control-flow op or symbolic-shape arithmetic.

ATen ops compute on tensors (and TorchScript's str/list/math builtins on values),
except those that take a file name, a raw storage, an RPC reference, a future or
a stream, and an explicit list touching process state (RNG seeds, autograd,
tracing, library caches): those are refused. ``quantized::`` ops (torch's int8
kernels) are allowed; every other namespace (custom ops, ``profiler::``,
``prim::Print`` and calls that could not be inlined) is refused.
"""

from __future__ import annotations

import ast
import math
import operator
import pickletools
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import torch

from common.errors import InvalidArgument

# Side effects outside the tensors: files, RNG state, autograd, RPC, threads.
_REFUSED = frozenset(
    {
        "aten::from_file",
        "aten::save",
        "aten::set_",
        "aten::manual_seed",
        "aten::seed",
        "aten::initial_seed",
        "aten::backward",
        "aten::grad",
        "aten::dist_backward",
        "aten::to_here",
        "aten::owner",
        "aten::owner_name",
        "aten::local_value",
        "aten::is_owner",
        "aten::confirmed_by_owner",
        "aten::wait",
        "aten::_get_tracing_state",
        "aten::_pin_memory",
        "aten::pin_memory",
        "aten::record_stream",
        "aten::_print",
        "aten::_cudnn_init_dropout_state",
        "aten::_sobol_engine_initialize_state_",
        "aten::_backward",
        "aten::set_data",
        "aten::_cufft_set_plan_cache_max_size",
        "aten::_cufft_clear_plan_cache",
    }
)

# TorchScript structure nodes: control flow, containers, attributes, metadata.
_PRIM_NODES = frozenset(
    {
        "prim::Constant",
        "prim::GetAttr",
        "prim::SetAttr",
        "prim::If",
        "prim::Loop",
        "prim::ListConstruct",
        "prim::ListUnpack",
        "prim::DictConstruct",
        "prim::TupleConstruct",
        "prim::TupleIndex",
        "prim::TupleUnpack",
        "prim::TupleSlice",
        "prim::CreateObject",
        "prim::RaiseException",
        "prim::Uninitialized",
        "prim::unchecked_cast",
        "prim::isinstance",
        "prim::TypeCheck",
        "prim::NumToTensor",
        "prim::ImplicitTensorToNum",
        "prim::device",
        "prim::dtype",
        "prim::layout",
        "prim::is_nested",
        "prim::is_cuda",
        "prim::is_cpu",
        "prim::is_quantized",
        "prim::is_sparse",
        "prim::is_mkldnn",
        "prim::is_meta",
        "prim::requires_grad",
        "prim::type",
        "prim::shape",
        "prim::data",
        "prim::name",
        "prim::min",
        "prim::max",
        "prim::abs",
        "prim::EnumName",
        "prim::EnumValue",
        "prim::unchecked_unwrap_optional",
        "prim::AutogradZero",
        "prim::AutogradAdd",
        "prim::StringIndex",
        "prim::tolist",
    }
)

_EFFECT_TYPES = ("Storage", "RRef", "Future", "Stream", "Capsule")

# Globals a torch.jit.save pickle references for its tensors and containers.
_PICKLE_GLOBALS = frozenset(
    {
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_qtensor"),
        ("collections", "OrderedDict"),
    }
)

# Non-ATen callables an exported graph uses for symbolic shapes and tuple outputs.
_EXPORT_FUNCTIONS = frozenset(
    {
        operator.getitem,
        operator.add,
        operator.sub,
        operator.mul,
        operator.floordiv,
        operator.truediv,
        operator.mod,
        operator.pow,
        operator.neg,
        operator.eq,
        operator.ne,
        operator.lt,
        operator.le,
        operator.gt,
        operator.ge,
        math.ceil,
        math.floor,
        math.sqrt,
        torch.sym_int,
        torch.sym_float,
        torch.sym_max,
        torch.sym_min,
        torch.sym_not,
        torch.sym_ite,
    }
)
_EXPORT_HIGHER_ORDER = frozenset({"cond", "while_loop", "wrap_with_set_grad_enabled", "wrap_with_autocast"})


def op_refusal(qualname: str) -> str | None:
    """Why the op named ``namespace::name`` may not run in an uploaded program, or None."""
    if qualname in _PRIM_NODES or qualname.startswith("quantized::"):
        return None
    if not qualname.startswith("aten::"):
        return "it is not a tensor op"
    if qualname in _REFUSED or qualname in _effectful_aten():
        return "it has effects outside its tensors"
    if qualname not in _aten_ops():
        return "it is not an op of this torch"
    return None


def check_archive_entries(path: Path, where: str) -> None:
    """Refuse a file that is not a zip or names an entry twice (Python's zipfile
    and torch's reader could then see different bytes)."""
    with _archive(path, where):
        pass


@contextmanager
def _archive(path: Path, where: str) -> Iterator[zipfile.ZipFile]:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise InvalidArgument(f"{where}: the artifact is not a zip archive: {exc}") from exc
    with archive:
        names = archive.namelist()
        if len(names) != len(set(names)):
            raise InvalidArgument(f"{where}: the archive has duplicate entries")
        yield archive


def check_torchscript_archive(path: Path, where: str) -> None:
    """Refuse an archive whose loading could run its own code (before ``torch.jit.load``)."""
    with _archive(path, where) as archive:
        for name in archive.namelist():
            if name.endswith(".pkl") and "/code/" not in name:
                _check_pickle(archive.read(name), name, where)
            elif "/code/" in name and name.endswith(".py"):
                _check_code(archive.read(name), name, where)


def check_torchscript_module(module: torch.jit.ScriptModule, where: str) -> None:
    """Refuse a loaded module any of whose methods calls a disallowed op."""
    for owner, submodule in module.named_modules():
        methods: Any = submodule._c._method_names()
        for method in methods:
            graph = submodule._c._get_method(method).graph.copy()
            torch._C._jit_pass_inline(graph)
            label = f"{owner or 'model'}.{method}"
            for node in _jit_nodes(graph.nodes()):
                kind = node.kind()
                reason = (
                    "it calls code that could not be inlined and checked"
                    if kind in ("prim::CallMethod", "prim::CallFunction")
                    else op_refusal(kind)
                )
                if reason is not None:
                    raise InvalidArgument(f"{where}: {label} calls {kind}, refused because {reason}")


def check_exported_program(program: torch.export.ExportedProgram, where: str) -> None:
    """Refuse a program whose graph (or a nested graph) calls a disallowed op."""
    for owner, submodule in program.graph_module.named_modules():
        if not isinstance(submodule, torch.fx.GraphModule):
            continue
        for node in submodule.graph.nodes:
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            label = f"{owner or 'graph'}.{node.name}"
            if node.op != "call_function":
                raise InvalidArgument(f"{where}: {label} is a {node.op} node; only op calls are allowed")
            reason = _export_target_refusal(node.target)
            if reason is not None:
                raise InvalidArgument(
                    f"{where}: {label} calls {_target_name(node.target)}, refused because {reason}"
                )


def _export_target_refusal(target: Any) -> str | None:
    if isinstance(target, torch._ops.OpOverload):
        return op_refusal(target.name().split(".")[0])
    if isinstance(target, torch._ops.HigherOrderOperator):
        return None if target.name() in _EXPORT_HIGHER_ORDER else "it is not a control-flow op"
    if target in _EXPORT_FUNCTIONS:
        return None
    return "it is not a tensor op"


def _target_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload | torch._ops.HigherOrderOperator):
        return str(target.name())
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__name__', repr(target))}"


def _jit_nodes(nodes: Any) -> Iterator[Any]:
    for node in nodes:
        yield node
        for block in node.blocks():
            yield from _jit_nodes(block.nodes())


def _check_pickle(data: bytes, name: str, where: str) -> None:
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name == "GLOBAL":
                module, _, attr = str(arg).partition(" ")
                if not _pickle_global_allowed(module, attr):
                    raise InvalidArgument(f"{where}: {name} references {module}.{attr}, which is not allowed")
            elif opcode.name in ("STACK_GLOBAL", "INST", "OBJ", "EXT1", "EXT2", "EXT4"):
                raise InvalidArgument(
                    f"{where}: {name} uses pickle opcode {opcode.name}, which is not allowed"
                )
    except ValueError as exc:
        raise InvalidArgument(f"{where}: {name} is not a valid pickle: {exc}") from exc


def _pickle_global_allowed(module: str, attr: str) -> bool:
    if (module, attr) in _PICKLE_GLOBALS:
        return True
    if module == "torch" and (
        attr.endswith("Storage") or isinstance(getattr(torch, attr, None), torch.dtype | torch.qscheme)
    ):
        return True
    if module == "torch.jit._pickle":
        return True  # list and type-tag builders the TorchScript unpickler implements natively
    if module == "__torch__.torch.classes.quantized":
        return True  # torch's own packed-weight classes for int8 layers
    # Scripted classes live under __torch__; torch's C++ classes under __torch__.torch.classes.
    return (module == "__torch__" or module.startswith("__torch__.")) and not module.startswith(
        "__torch__.torch.classes"
    )


def _check_code(data: bytes, name: str, where: str) -> None:
    try:
        tree = ast.parse(data.decode("utf-8"), filename=name)
    except (SyntaxError, UnicodeDecodeError, ValueError) as exc:
        raise InvalidArgument(f"{where}: {name} is not TorchScript code that can be checked") from exc
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name in ("__setstate__", "__getstate__"):
            raise InvalidArgument(
                f"{where}: {name} defines {node.name}, which would run while the archive loads; "
                "custom serialization is not allowed"
            )


@cache
def _aten_ops() -> frozenset[str]:
    """Every ATen op name: dispatcher kernels and TorchScript's str/list/dict/math builtins."""
    dispatcher = {full.partition(".")[0] for full in torch._C._dispatch_get_all_op_names()}
    return frozenset(
        n for n in dispatcher | {s.name for s in torch._C._jit_get_all_schemas()} if n.startswith("aten::")
    )


@cache
def _effectful_aten() -> frozenset[str]:
    """ATen ops that reach past their tensors: a file name, a raw storage, an RPC
    reference, a future or a device stream among their arguments."""
    effectful: set[str] = set()
    for schema in torch._C._jit_get_all_schemas():
        for argument in schema.arguments:
            kind = str(argument.type)
            if argument.name == "filename" or any(word in kind for word in _EFFECT_TYPES):
                effectful.add(schema.name)
    return frozenset(effectful)
