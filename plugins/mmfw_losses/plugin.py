"""Built-in losses, registered through the ``mmfw`` entry point ``losses``."""

from mmfw.spi import hookimpl

from .barlow_twins import BarlowTwins
from .decorrelation import Decorrelation
from .distillation import Distillation
from .hard_negative import HardNegative
from .infonce import InfoNCE
from .itm import ITM
from .memory_queue import MemoryQueue
from .mixture import Mixture
from .ntxent import NTXent
from .siglip import SigLIP
from .simple_contrastive import SimpleContrastive
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
    }
