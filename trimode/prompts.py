"""General chat prompts written for this project: a training set built from templates and a held-out
evaluation set written separately (different wording, different topics), so the `chat` benchmark
category measures drafting on requests the drafter never saw.

Both are plain English user turns; the model's chat template is applied by the caller.
"""

from __future__ import annotations

# -- training: templates x topics (deterministic order) --------------------------------------------
TRAIN_TEMPLATES = (
    "Explain {t} in simple terms.",
    "What is {t}? Give a short answer.",
    "Write a short paragraph about {t}.",
    "List three facts about {t}.",
    "Why is {t} important?",
    "Give me a beginner's introduction to {t}.",
    "Describe {t} to a ten-year-old.",
    "What are the advantages and disadvantages of {t}?",
    "Summarize the history of {t} in a few sentences.",
    "Write a haiku about {t}.",
    "How would you teach {t} to a new student?",
    "Tell me a fun fact about {t}.",
    "What are common misconceptions about {t}?",
    "Write a short email to a friend recommending they learn about {t}.",
)

TRAIN_TOPICS = (
    "photosynthesis", "the water cycle", "black holes", "the French Revolution", "machine learning",
    "the stock market", "climate change", "volcanoes", "the human heart", "democracy", "recycling",
    "the Roman Empire", "electric cars", "bees", "the internet", "vaccines", "the Moon", "chess",
    "coffee", "sleep", "the Great Wall of China", "earthquakes", "solar panels", "DNA", "rainbows",
    "the printing press", "dinosaurs", "inflation", "the Olympic Games", "gravity", "bread baking",
    "the piano", "tea", "honeybees", "the ocean tides", "cloud computing", "password security",
    "the immune system", "supply and demand", "renewable energy", "jazz music", "the Renaissance",
    "meditation", "the Amazon rainforest", "penguins", "magnets", "compound interest", "the Sahara desert",
    "public libraries", "bicycles", "the metric system", "friendship", "time management", "gardening",
    "the periodic table", "ancient Egypt", "sharks", "weather forecasting", "social media", "robots",
    "the speed of light", "mountains", "museums", "the human brain", "trains", "the violin", "yoga",
    "budgeting", "the Industrial Revolution", "glaciers", "open source software", "the Milky Way",
    "nutrition", "elections", "bridges", "lighthouses", "the alphabet", "clocks", "maps", "airplanes",
    "rivers", "forests", "cheese", "soap", "origami", "volunteering", "public speaking", "the seasons",
)


def chat_train_texts() -> list[str]:
    """Every template with every topic (1,232 prompts), in a fixed order."""
    return [tpl.format(t=t) for t in TRAIN_TOPICS for tpl in TRAIN_TEMPLATES]


# -- training, second set: everyday advice and short creative requests (the style of most chat traffic),
# again templates x topics; none of their wordings or topics is one of the held-out prompts below.
ADVICE_TEMPLATES = (
    "What are some practical tips for {t}?",
    "I want to get better at {t}. Where should I start?",
    "What mistakes do people often make when {t}?",
    "Give me a step-by-step plan for {t}.",
    "What should I know before {t}?",
    "Can you make me a short checklist for {t}?",
    "My friend is nervous about {t}. What could I tell them?",
    "Share three ideas that make {t} easier.",
    "How long does it usually take to get comfortable with {t}?",
    "Write an encouraging message for someone who is {t} for the first time.",
)
ADVICE_TOPICS = (
    "writing a cover letter", "learning to swim", "painting a room", "organizing a closet",
    "planning a road trip", "moving to a new city", "training a puppy", "baking cookies",
    "starting a vegetable garden", "learning to play the guitar", "writing a wedding speech",
    "negotiating a salary", "fixing a flat bicycle tire", "choosing a laptop", "taking photos with a phone",
    "meeting people in a new town", "keeping a journal", "reducing screen time", "cooking rice",
    "hosting a board game night", "preparing for a long flight", "learning to draw", "decluttering a kitchen",
    "asking for feedback at work", "teaching a child to read", "caring for a goldfish", "building a birdhouse",
    "reading more books", "getting up earlier", "working from home", "making friends as an adult",
    "packing for a business trip", "learning to knit", "planning a surprise party", "washing windows",
    "looking after a car", "saving for retirement", "writing a complaint letter", "sleeping on hot nights",
    "reducing food waste", "learning to cook for a family", "giving a presentation at work",
    "choosing running shoes", "caring for a new kitten",
)
CREATIVE_TEMPLATES = (
    "Compose a four-line poem on {t}.",
    "Write a diary entry from the point of view of {t}.",
    "Invent a short fable featuring {t}.",
    "Describe {t} using all five senses.",
)
CREATIVE_TOPICS = (
    "a rusty bicycle", "the first snow of winter", "a busy train station", "an old lighthouse keeper",
    "a curious fox", "a forgotten toy", "a city at night", "a sailboat at sea", "a grandfather clock",
    "a crowded market", "the last day of school", "a garden after the rain", "a paper airplane",
    "a street musician", "a tired delivery driver",
)


def advice_train_texts() -> list[str]:
    """The second training set (500 prompts), in a fixed order."""
    return ([tpl.format(t=t) for t in ADVICE_TOPICS for tpl in ADVICE_TEMPLATES]
            + [tpl.format(t=t) for t in CREATIVE_TOPICS for tpl in CREATIVE_TEMPLATES])


# -- held out: written separately; no template or topic above is reused --------------------------
CHAT_HELDOUT = (
    "Can you suggest a simple dinner recipe for two people?",
    "How do I politely decline an invitation to a party?",
    "What should I pack for a weekend camping trip?",
    "Give me some tips for improving my handwriting.",
    "How can I stay motivated while studying for exams?",
    "Write a thank-you note to a teacher.",
    "What are some good ways to save money on groceries?",
    "How do airplanes stay in the air?",
    "What is the difference between weather and climate?",
    "Suggest a name for a small bakery and explain why.",
    "How do I start running if I have never exercised before?",
    "What happens when we dream?",
    "Write a short poem about autumn leaves.",
    "Explain how a refrigerator keeps food cold.",
    "What are some fun activities for a rainy day?",
    "How should I prepare for a job interview?",
    "Why do cats purr?",
    "Give me three ideas for a birthday present for my grandmother.",
    "How does a credit card work?",
    "What is the best way to learn a new language?",
    "Describe a typical day in the life of a farmer.",
    "How do I make my houseplants grow better?",
    "What causes thunder and lightning?",
    "Write a short story about a lost umbrella.",
    "How can I be a better listener?",
    "What is the purpose of a resume?",
    "Explain why the sky is blue.",
    "How do I clean a cast iron pan?",
    "What are the rules of tic-tac-toe?",
    "Give me advice for my first day at a new school.",
    "How does a compass work?",
    "What are some healthy breakfast options?",
)


# -- where benchmark / training data lives ---------------------------------------------------------
def data_root(path=None, *, required: bool = True):
    """The GSM8K / MBPP / HumanEval directory: `path` if given, else $TRIMODE_DATA, else `shared/data`
    beside the checkout (the developers' layout). With `required`, a missing directory is a ValueError
    that says how to point at one; otherwise None is returned for it."""
    import os
    from pathlib import Path

    if path is not None:
        d, how = Path(path), "the given data directory"
    elif os.environ.get("TRIMODE_DATA"):
        d, how = Path(os.environ["TRIMODE_DATA"]), "$TRIMODE_DATA"
    else:
        d, how = Path(__file__).resolve().parents[2] / "shared" / "data", "the default ../shared/data"
    if d.is_dir():
        return d
    if required:
        raise ValueError(f"{how} {d} does not exist: pass --data DIR or set TRIMODE_DATA to a directory holding "
                         "gsm8k/, mbpp/ and humaneval/")
    return None
