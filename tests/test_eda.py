"""EDA helpers that shape tables for plots."""

import numpy as np
import pandas as pd

from lib import eda


def test_hu_long_keeps_a_seeded_bounded_share_per_structure() -> None:
    organs = pd.DataFrame({"structure": ["liver", "liver", "spleen"],
                           "hu_sample": [np.arange(30.0), np.arange(30.0, 50.0), np.arange(5.0)]})
    full = eda.hu_long(organs)
    assert len(full) == 55 and set(full.structure) == {"liver", "spleen"}
    thin = eda.hu_long(organs, per_structure=10, seed=3)
    assert thin.groupby("structure").size().to_dict() == {"liver": 10, "spleen": 5}
    assert set(thin.HU) <= set(full.HU)
    assert thin.equals(eda.hu_long(organs, per_structure=10, seed=3))
    assert not thin.equals(eda.hu_long(organs, per_structure=10, seed=4))
