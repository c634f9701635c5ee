"""What every fused module shares: its ``backend`` attribute and its answer to TorchScript."""

from __future__ import annotations


class Fused:
    """Mixed into each fused module, before its ``torch.nn`` base class.

    ``backend`` (None: the package's policy, as ``"auto"``) picks the kernels of the module's own
    calls; ``fused_attn.optimize(model, backend=...)`` sets it on every fused module.
    """

    backend: str | None = None

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every module it compiles, before reading any code: the
        # fused ops are Python-level custom ops and their dispatch (argument checks, backend
        # choice) is Python that TorchScript cannot compile, so say so here, by name.
        raise TypeError(
            f"{type(self).__name__} cannot be compiled by torch.jit.script; use torch.compile or "
            "torch.export, which capture the fused ops whole (fused_attn.restore(model) gives back "
            "the torch.nn modules, for TorchScript)"
        )


class FusedLayer(Fused):
    """A fused layer whose fused submodules (``_fused_children``) follow its ``backend``: setting
    ``layer.backend`` moves the whole layer, its attention and norms included."""

    _fused_children: tuple[str, ...] = ()

    @property
    def backend(self) -> str | None:
        return self.__dict__.get("backend")

    @backend.setter
    def backend(self, value: str | None) -> None:
        self.__dict__["backend"] = value
        for name in self._fused_children:
            child = self._modules.get(name)
            if isinstance(child, Fused):
                child.backend = value
