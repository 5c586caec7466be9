"""Envoy's response flags (userspace_l7/flags.py): one string per answer, in Envoy's order."""

from userspace_l7 import flags


def test_join_orders_as_envoy_prints_and_drops_none():
    assert flags.join() == "-"
    assert flags.join(flags.NONE, "") == "-"
    assert flags.join(flags.URX, flags.UF) == "UF,URX"  # as Envoy logs a connect failure out of retries
    assert flags.join("DI", flags.FI) == "DI,FI"
    assert flags.join("UT,URX", flags.DC) == "UT,DC,URX"
    assert flags.join(flags.UF, flags.UF) == "UF"


def test_every_flag_the_processor_sets_is_envoys():
    envoy = {"LH", "UH", "UT", "LR", "UR", "UF", "UC", "UO", "NR", "DI", "FI", "RL", "UAEX", "RLSE", "DC", "URX",
             "SI", "IH", "DPE", "UMSDR", "RFCF", "NFCF", "DT", "UPE", "NC", "OM", "DF", "DO", "DR", "UDO"}
    ours = {getattr(flags, name) for name in flags.__all__ if name not in ("NONE", "join")}
    assert ours <= envoy
