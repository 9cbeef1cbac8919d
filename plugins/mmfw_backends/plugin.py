"""Built-in backends, registered through the ``mmfw`` entry point ``backends``."""

from mmfw.spi import hookimpl

from .devices import CPUBackend, CUDABackend, MPSBackend, auto_backend


@hookimpl
def mmfw_backends():
    return {"auto": auto_backend, "cpu": CPUBackend, "cuda": CUDABackend, "mps": MPSBackend}
