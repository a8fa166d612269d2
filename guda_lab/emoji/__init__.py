"""The emoji benchmarks: the same emoji drawn by independent design teams, groups = styles.

:mod:`.sources` pins the npm packages, :mod:`.prepare` builds the cached dataset
(``guda prepare emoji-styles``, :mod:`.commands`), :mod:`.benchmarks` builds the grouped training sets.
See docs/evaluation.md#emoji-styles.
"""

from .benchmarks import contributors_comparisons, emoji_contributors, emoji_styles, emoji_styles_unconditional
from .prepare import DEFAULT_SIZE, PreparedEmoji, dataset_dir, default_cache_dir, load_prepared, prepare_emoji_styles
from .sources import DEFAULT_STYLES, SOURCES, EmojiSource, integrity_of

__all__ = [
    "DEFAULT_SIZE", "DEFAULT_STYLES", "SOURCES", "EmojiSource", "PreparedEmoji", "contributors_comparisons", "dataset_dir",
    "default_cache_dir", "emoji_contributors", "emoji_styles", "emoji_styles_unconditional", "integrity_of", "load_prepared",
    "prepare_emoji_styles",
]
