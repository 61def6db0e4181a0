"""Rewards for `cmgen eval reward`: the shared registry in cmgen.rewards, re-exported here."""
from __future__ import annotations

from cmgen.rewards import REWARDS, Reward, build_reward, reward_names  # noqa: F401
from cmgen.rewards.digits import digit_class as digit_class_reward  # noqa: F401
from cmgen.rewards.image import brightness_of, jpeg_kilobytes  # noqa: F401
from cmgen.rewards.weights import (AESTHETIC_FILE, AESTHETIC_URL, linear_stack_from_state,  # noqa: F401
                                   load_aesthetic_head)
