"""The authors' NCSN checkpoints (ermongroup/ncsn): their parameter names mapped onto model.py's.

Their checkpoint.pth is the list [state_dict of a DataParallel-wrapped CondRefineNetDilated, Adam state]; their
names differ from ours in four places, everything else is the same path:
    normalizer.*                          -> end_norm.*
    <block>.normalize1 / normalize2       -> <block>.norm1 / norm2
    refineK.adapt_convs.j.<b>_<s>_norm    -> refineK.adapt.j.norms.<2(b-1) + (s-1)>   (and _conv -> convs)
    refineK.output_convs.<b>_<s>_norm     -> refineK.out.norms.<2(b-1) + (s-1)>       (and _conv -> convs)
The mapping is checked to be total both ways, with matching shapes, before anything is loaded.
"""
import re

from common import NCSNError

DATAPARALLEL_PREFIX = "module."
RCU_STAGES = 2  # stages per block of their CondRCUBlock (and ours)
_RCU = re.compile(r"(adapt_convs\.\d+|output_convs)\.(\d+)_(\d+)_(norm|conv)\.")


def our_name(their_name):
    """Our parameter name for one of theirs (with or without DataParallel's 'module.' prefix)."""
    k = their_name[len(DATAPARALLEL_PREFIX):] if their_name.startswith(DATAPARALLEL_PREFIX) else their_name
    k = re.sub(r"^normalizer\.", "end_norm.", k)
    k = re.sub(r"\.normalize([12])\.", r".norm\1.", k)
    k = _RCU.sub(lambda m: f"{m.group(1)}.{m.group(4)}s.{(int(m.group(2)) - 1) * RCU_STAGES + int(m.group(3)) - 1}.",
                 k)
    return k.replace("adapt_convs.", "adapt.").replace("output_convs.", "out.")


def map_state_dict(theirs, ours_template, source="checkpoint"):
    """Their model state dict renamed to ours. `ours_template` is our model's state_dict() (names and shapes).
    Every key of theirs must map to exactly one of ours and back, with the same shape: otherwise a one-line
    NCSNError naming the first offending key."""
    mapped = {}
    for k, v in theirs.items():
        name = our_name(k)
        if name in mapped:
            raise NCSNError(f"{source}: two of its parameters map to {name} (one is {k})")
        if name not in ours_template:
            raise NCSNError(f"{source}: parameter {k} has no counterpart in model.py (it would be {name})")
        if tuple(v.shape) != tuple(ours_template[name].shape):
            raise NCSNError(f"{source}: parameter {k} has shape {tuple(v.shape)}, model.py's {name} has "
                            f"{tuple(ours_template[name].shape)}")
        mapped[name] = v
    missing = [k for k in ours_template if k not in mapped]
    if missing:
        raise NCSNError(f"{source}: model.py's parameter {missing[0]} is missing from it"
                        f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}")
    return mapped
