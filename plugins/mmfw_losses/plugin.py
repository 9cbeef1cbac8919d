"""Built-in losses, registered through the ``mmfw`` entry point ``losses``, and the callbacks
that build the state some of them need from the whole training set (``prototypes`` for
``prototypical``, ``global-negatives`` for ``memory_queue`` in global mode)."""

from mmfw.spi import hookimpl

from .alignment import Alignment
from .barlow_twins import BarlowTwins
from .decorrelation import Decorrelation
from .distillation import Distillation
from .global_negatives import global_negatives_callback
from .hard_negative import HardNegative
from .infonce import InfoNCE
from .itm import ITM
from .memory_queue import MemoryQueue
from .mixture import Mixture
from .ntxent import NTXent
from .prototypes import prototypes_callback
from .prototypical import Prototypical
from .siglip import SigLIP
from .simple_contrastive import SimpleContrastive
from .spectral import Spectral
from .supcon import SupCon
from .vicreg import VICReg


@hookimpl
def mmfw_losses():
    return {
        "infonce": InfoNCE,
        "siglip": SigLIP,
        "simple_contrastive": SimpleContrastive,
        "memory_queue": MemoryQueue,
        "hard_negative": HardNegative,
        "decorrelation": Decorrelation,
        "vicreg": VICReg,
        "barlow_twins": BarlowTwins,
        "supcon": SupCon,
        "ntxent": NTXent,
        "distillation": Distillation,
        "mixture": Mixture,
        "itm": ITM,
        "prototypical": Prototypical,
        "spectral": Spectral,
        "alignment": Alignment,
    }


@hookimpl
def mmfw_callbacks():
    return {"prototypes": prototypes_callback, "global-negatives": global_negatives_callback}
