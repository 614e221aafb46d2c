"""The closed world the personas, scripted partners, judges and the tiny model's corpus share.

Items are single words so that a judge can recognise them exactly and a tiny model can learn them.
"""

from __future__ import annotations

CATEGORIES: dict[str, tuple[str, ...]] = {
    "music": ("jazz", "rock", "classical", "hiphop", "folk", "techno", "blues", "reggae"),
    "food": ("sushi", "pizza", "curry", "tacos", "salad", "ramen", "pasta", "dumplings"),
    "hobby": ("hiking", "chess", "painting", "cycling", "yoga", "gardening", "swimming", "photography"),
    "books": ("mystery", "poetry", "history", "scifi", "fantasy", "biography", "romance", "science"),
    "travel": ("mountains", "beaches", "museums", "islands", "deserts", "forests", "cities", "lakes"),
}

# Fact slots: the answers a persona gives about itself (persona consistency checks them).
FACT_SLOTS: dict[str, tuple[str, ...]] = {
    "city": ("lisbon", "oslo", "nairobi", "lima", "kyoto", "toronto", "cairo", "dublin", "seoul", "madrid"),
    "job": (
        "nurse",
        "teacher",
        "baker",
        "engineer",
        "farmer",
        "pilot",
        "lawyer",
        "artist",
        "chef",
        "student",
    ),
    "pet": ("cat", "dog", "parrot", "rabbit", "turtle", "hamster", "none"),
    "sibling": ("brother", "sister", "twins", "none"),
}

TRAITS = (
    "curious",
    "impatient",
    "cheerful",
    "anxious",
    "skeptical",
    "warm",
    "shy",
    "talkative",
    "pragmatic",
    "dreamy",
    "competitive",
    "calm",
)

ITEM_CATEGORY: dict[str, str] = {item: cat for cat, items in CATEGORIES.items() for item in items}
