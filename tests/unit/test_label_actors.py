"""The labeling pool's CPU request against the Ray cluster's CPUs (no Ray needed)."""

import pytest

from distill.config import build_config
from tasks.label import check_actor_cpus


def label(**over):
    return build_config({"label": over}).label


def test_a_pool_larger_than_the_cluster_is_refused_naming_the_keys():
    with pytest.raises(ValueError, match=r"label\.num_actors = 3 × label\.cpus_per_actor = 1 = 3 CPUs, "
                                         r"but the Ray cluster has 2: .*never all be scheduled"):
        check_actor_cpus(label(num_actors=3, cpus_per_actor=1.0), 2.0)
    with pytest.raises(ValueError, match="has 0"):
        check_actor_cpus(label(num_actors=1), 0.0)


def test_a_pool_that_fits_passes():
    check_actor_cpus(label(num_actors=2, cpus_per_actor=1.0), 2.0)  # every CPU: fine, reads take none
    check_actor_cpus(label(num_actors=3, cpus_per_actor=0.5), 2.0)
    check_actor_cpus(label(num_actors=3, cpus_per_actor=0.1), 0.3)  # float sums within rounding
