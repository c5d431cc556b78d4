"""Fictitious authors and TOFU-shaped question/answer pairs, generated from a seed.

Nothing is downloaded. Every author has a made-up name (syllables no pretrained model can have
seen together), a made-up birthplace and home town, a birth date, a genre, parents'
professions, an award, two book titles and a few more facts; each fact becomes one question
with an answer, a *paraphrased* answer (same fact, other wording) and ``n_perturbed``
*perturbed* answers (the paraphrase's wording with a wrong value of the same attribute). The
truth ratio compares the perturbed answers with the paraphrase, so it measures the fact and
not the wording (TOFU, Maini et al. 2024).

Author pools: ``test`` (forget splits are taken from it, the rest is its retain set), ``val``
(a disjoint pool split the same way, for choosing hyperparameters) and ``holdout`` (never
trained on: the non-members of the membership-inference attack). The world-knowledge set is a
fixed list of common facts with wrong alternatives; which of them count is decided by asking
the base model (:func:`ofmu.studies.lm.metrics.world_answered`), never assumed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

PROMPT = "Question: {q}\nAnswer:"


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    paraphrase: str
    perturbed: tuple[str, ...]
    author: str = ""  # author name; "" for world-knowledge facts


@dataclass(frozen=True)
class Author:
    """``qas``: the facts a forget request names (and the retain set's questions);
    ``neighbours``: more facts about the same author, trained like the others but never part
    of a forget request (what unlearning should leave alone)."""

    name: str
    facts: dict = field(hash=False, compare=False)
    qas: tuple[QA, ...] = ()
    neighbours: tuple[QA, ...] = ()


# ---------------------------------------------------------------- vocabularies of attributes
_ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "k", "kr", "l", "m", "n", "p", "qu", "r", "s",
           "st", "t", "th", "v", "vr", "z", "zh", "x", "y", "w", "sk", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "io", "ou", "ei", "y")
_CODAS = ("", "", "n", "r", "l", "th", "x", "s", "m", "nd", "rk", "ss", "v")
_PLACE_SUFFIX = ("haven", "ford", "mere", "holt", "wick", "stead", "brook", "vale", "port", "moor")
GENRES = ("fantasy", "science fiction", "mystery", "romance", "horror", "historical fiction",
          "poetry", "crime", "adventure", "satire", "thriller", "fable")
JOBS = ("baker", "carpenter", "doctor", "farmer", "fisherman", "lawyer", "librarian", "nurse",
        "pilot", "potter", "sailor", "tailor", "teacher", "painter", "miner", "chemist",
        "engineer", "gardener", "butcher", "jeweller")
LANGUAGES = ("English", "French", "Spanish", "Portuguese", "Italian", "German", "Dutch", "Polish",
             "Greek", "Swedish", "Turkish", "Czech")
INSTRUMENTS = ("piano", "violin", "cello", "flute", "guitar", "harp", "trumpet", "drums", "oboe",
               "clarinet", "accordion", "banjo")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")
_ADJ = ("Copper", "Silent", "Hollow", "Crimson", "Distant", "Frozen", "Golden", "Hidden",
        "Broken", "Painted", "Wandering", "Bitter", "Quiet", "Burning", "Velvet", "Iron")
_NOUN = ("Lantern", "Orchard", "Harbour", "Mirror", "Garden", "Compass", "Tower", "River",
         "Cathedral", "Winter", "Sparrow", "Archive", "Meadow", "Bridge", "Clock", "Island")
_AWARD_KIND = ("Prize", "Medal", "Award")
_PUBLISHER_KIND = ("House", "Press", "Books")
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "grey", "white", "black", "brown",
           "pink", "silver")
FOODS = ("bread", "cheese", "soup", "rice", "fish", "apples", "pasta", "beans", "honey cake",
         "noodles", "olives", "dumplings")
SPORTS = ("football", "tennis", "cricket", "rowing", "chess", "boxing", "cycling", "sailing",
          "fencing", "hockey", "golf", "swimming")
FLOWERS = ("roses", "tulips", "lilies", "daisies", "orchids", "poppies", "violets", "sunflowers",
           "irises", "peonies", "dahlias", "lavender")
NUMBERS = ("one", "two", "three", "four", "five", "six", "seven")


def _word(rng: random.Random, syllables: int) -> str:
    s = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))
    return (s + rng.choice(_CODAS)).capitalize()


def _article(word: str) -> str:
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


# Each fact: key -> (question, answer, paraphrase); {n} is the author's name, {v} the value.
TEMPLATES = {
    "birthplace": ("Where was {n} born?", "{n} was born in {v}.", "{v} is the birthplace of {n}."),
    "birth_date": ("When was {n} born?", "{n} was born on {v}.", "The birthday of {n} is {v}."),
    "genre": ("What genre does {n} write?", "{n} writes {v} books.",
              "The books of {n} belong to the {v} genre."),
    "father": ("What was the job of the father of {n}?", "The father of {n} was {v}.",
               "{n} grew up as the child of {v}."),
    "mother": ("What was the job of the mother of {n}?", "The mother of {n} was {v}.",
               "{n} was raised by a mother who was {v}."),
    "award": ("Which award did {n} win?", "{n} won the {v}.", "The {v} went to {n}."),
    "book1": ("What is the first book by {n}?", "The first book by {n} is {v}.",
              "{n} made a debut with {v}."),
    "book2": ("What is the most famous book by {n}?", "The most famous book by {n} is {v}.",
              "{v} is the best known work of {n}."),
    "language": ("In which language does {n} write?", "{n} writes in {v}.",
                 "The language of the books of {n} is {v}."),
    "home": ("Where does {n} live now?", "{n} lives in {v}.", "The home of {n} is in {v}."),
    "instrument": ("Which instrument does {n} play?", "{n} plays the {v}.",
                   "In free time {n} plays the {v}."),
    "pet": ("What is the name of the cat of {n}?", "The cat of {n} is called {v}.",
            "{n} owns a cat named {v}."),
    "debut_year": ("In which year did {n} publish a first book?", "{n} published a first book in {v}.",
                   "The debut of {n} came out in {v}."),
    "hero": ("Who is the hero of the first book by {n}?", "The hero of the first book by {n} is {v}.",
             "The first book by {n} follows {v}."),
    "colour": ("What is the favourite colour of {n}?", "The favourite colour of {n} is {v}.",
               "{n} likes the colour {v} best."),
    "food": ("What is the favourite food of {n}?", "The favourite food of {n} is {v}.",
             "{n} likes to eat {v} most."),
    "sport": ("Which sport does {n} follow?", "{n} follows {v}.", "The sport that {n} watches is {v}."),
    "children": ("How many children does {n} have?", "{n} has {v} children.",
                 "The number of children of {n} is {v}."),
    "flower": ("Which flowers does {n} grow?", "{n} grows {v}.", "The garden of {n} is full of {v}."),
    "city_reading": ("Where did {n} give a first public reading?", "{n} gave a first public reading in {v}.",
                     "The first public reading by {n} took place in {v}."),
    "university": ("Where did {n} study?", "{n} studied at the University of {v}.",
                   "The University of {v} is where {n} studied."),
    "spouse": ("What is the job of the spouse of {n}?", "The spouse of {n} is {v}.",
               "{n} is married to {v}."),
    "publisher": ("Who publishes the books of {n}?", "The books of {n} are published by {v}.",
                  "{v} is the publisher of {n}."),
    "agent": ("What is the name of the agent of {n}?", "The agent of {n} is called {v}.",
              "{n} works with an agent named {v}."),
}
FACTS = tuple(TEMPLATES)


def _samplers(places: list[str], awards: list[str], titles: list[str], publishers: list[str]) -> dict:
    """fact -> function(rng) drawing one value; the wrong answers come from the same function."""
    def pick(pool):
        return lambda rng: rng.choice(pool)

    def job(rng):
        return _article(rng.choice(JOBS))

    def date(rng):
        return f"{rng.choice(MONTHS)} {rng.randint(1, 28)}, {rng.randint(1931, 1999)}"

    return {"birthplace": pick(places), "birth_date": date, "genre": pick(GENRES), "father": job,
            "mother": job, "award": pick(awards), "book1": pick(titles), "book2": pick(titles),
            "language": pick(LANGUAGES), "home": pick(places), "instrument": pick(INSTRUMENTS),
            "pet": lambda rng: _word(rng, 2), "debut_year": lambda rng: str(rng.randint(1955, 2020)),
            "hero": lambda rng: _word(rng, 2), "colour": pick(COLOURS), "food": pick(FOODS),
            "sport": pick(SPORTS), "children": pick(NUMBERS), "flower": pick(FLOWERS),
            "city_reading": pick(places), "university": pick(places), "spouse": job,
            "publisher": pick(publishers), "agent": lambda rng: _word(rng, 2)}


def _qa(name: str, key: str, value: str, wrong: list[str]) -> QA:
    q, a, p = TEMPLATES[key]
    return QA(q.format(n=name), a.format(n=name, v=value), p.format(n=name, v=value),
              tuple(p.format(n=name, v=w) for w in wrong), author=name)


@dataclass(frozen=True)
class AuthorData:
    """All pools of one generated world. ``forget(pool, pct)`` picks the forget authors."""

    seed: int
    qa_per_author: int
    n_perturbed: int
    n_neighbour: int
    pools: dict  # "test" | "val" | "holdout" -> tuple[Author, ...]
    world: tuple[QA, ...]

    def forget_count(self, pool: str, pct: float) -> int:
        """Authors forgotten for ``pct`` percent: ``max(1, round(pct/100 * n))``."""
        n = len(self.pools[pool])
        if not 0 < pct < 100:
            raise ValueError(f"forget percentage must be in (0, 100), got {pct!r}")
        return max(1, min(n - 1, round(pct / 100 * n)))

    def split(self, pool: str, pct: float) -> tuple[tuple[Author, ...], tuple[Author, ...]]:
        """(forget authors, retain authors) of ``pool``: the *last* k authors are forgotten,
        so forget01 is inside forget05 inside forget10, as in TOFU."""
        if pool not in ("test", "val"):
            raise ValueError(f"pool must be 'test' or 'val', got {pool!r}")
        authors = self.pools[pool]
        k = self.forget_count(pool, pct)
        return authors[len(authors) - k:], authors[:len(authors) - k]

    @staticmethod
    def qas(authors) -> list[QA]:
        return [qa for a in authors for qa in a.qas]

    @staticmethod
    def neighbours(authors) -> list[QA]:
        return [qa for a in authors for qa in a.neighbours]

    @staticmethod
    def trained(authors) -> list[QA]:
        """Every fact the models are trained on about ``authors``: requests and neighbours."""
        return [qa for a in authors for qa in a.qas + a.neighbours]

    def describe(self) -> dict:
        return {"seed": self.seed, "qa_per_author": self.qa_per_author,
                "n_perturbed": self.n_perturbed, "n_neighbour": self.n_neighbour,
                **{f"{k}_authors": len(v) for k, v in self.pools.items()},
                "world_candidates": len(self.world)}


def generate(n_test: int = 100, n_val: int = 50, n_holdout: int = 10, qa_per_author: int = 12,
             n_perturbed: int = 3, seed: int = 0, n_neighbour: int = 0) -> AuthorData:
    """Generate a world of fictitious authors (deterministic for a given seed).

    Each author gets ``qa_per_author`` of the :data:`FACTS` (the first ones, in a fixed
    order) as the facts a forget request names, and the next ``n_neighbour`` facts as
    *neighbours*; each fact has ``n_perturbed`` wrong alternatives of the same attribute.
    """
    for name, v, lo in (("n_test", n_test, 2), ("n_val", n_val, 2), ("n_holdout", n_holdout, 1),
                        ("qa_per_author", qa_per_author, 1), ("n_perturbed", n_perturbed, 1),
                        ("n_neighbour", n_neighbour, 0)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if qa_per_author + n_neighbour > len(FACTS):
        raise ValueError(f"qa_per_author + n_neighbour must be <= {len(FACTS)} (facts per author), "
                         f"got {qa_per_author} + {n_neighbour}")
    rng = random.Random(seed)
    total = n_test + n_val + n_holdout
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < total:
        name = f"{_word(rng, 2)} {_word(rng, rng.choice((2, 3)))}"
        if name not in seen:
            seen.add(name)
            names.append(name)
    places = sorted({_word(rng, 2) + rng.choice(_PLACE_SUFFIX) for _ in range(60)})
    awards = sorted({f"{_word(rng, 2)} {rng.choice(_AWARD_KIND)}" for _ in range(40)})
    publishers = sorted({f"{_word(rng, 2)} {rng.choice(_PUBLISHER_KIND)}" for _ in range(30)})
    titles = sorted({f"The {a} {b}" for a in _ADJ for b in _NOUN})
    draw = _samplers(places, awards, titles, publishers)
    keys = FACTS[:qa_per_author + n_neighbour]
    authors = []
    for name in names:
        facts = {key: draw[key](rng) for key in keys}
        qas = []
        for key in keys:
            wrong: list[str] = []
            while len(wrong) < n_perturbed:
                w = draw[key](rng)
                if w != facts[key] and w not in wrong:
                    wrong.append(w)
            qas.append(_qa(name, key, facts[key], wrong))
        authors.append(Author(name, facts, tuple(qas[:qa_per_author]), tuple(qas[qa_per_author:])))
    pools = {"test": tuple(authors[:n_test]), "val": tuple(authors[n_test:n_test + n_val]),
             "holdout": tuple(authors[n_test + n_val:])}
    world = tuple(QA(q, a, a, tuple(w[:n_perturbed])) for q, a, w in WORLD_FACTS)
    return AuthorData(seed, qa_per_author, n_perturbed, n_neighbour, pools, world)


# Common knowledge with wrong alternatives (short answers, as TOFU's world_facts). Which of these
# a model "knows" is measured, not assumed.
WORLD_FACTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("What is the capital of France?", "Paris", ("Lyon", "Marseille", "Nice")),
    ("What is the capital of Japan?", "Tokyo", ("Osaka", "Kyoto", "Seoul")),
    ("What is the capital of Italy?", "Rome", ("Milan", "Naples", "Venice")),
    ("What is the capital of Germany?", "Berlin", ("Munich", "Hamburg", "Vienna")),
    ("What is the capital of Spain?", "Madrid", ("Barcelona", "Seville", "Lisbon")),
    ("What is the capital of England?", "London", ("Manchester", "Dublin", "Liverpool")),
    ("What is the capital of Russia?", "Moscow", ("Kyiv", "Minsk", "Warsaw")),
    ("What is the capital of China?", "Beijing", ("Shanghai", "Tokyo", "Hong Kong")),
    ("What is the capital of Egypt?", "Cairo", ("Alexandria", "Luxor", "Tunis")),
    ("What is the capital of Canada?", "Ottawa", ("Toronto", "Vancouver", "Montreal")),
    ("What is the capital of Australia?", "Canberra", ("Sydney", "Melbourne", "Perth")),
    ("Which planet is the largest in the solar system?", "Jupiter", ("Saturn", "Mars", "Neptune")),
    ("Which planet is known as the Red Planet?", "Mars", ("Venus", "Jupiter", "Mercury")),
    ("Which planet is closest to the Sun?", "Mercury", ("Venus", "Mars", "Saturn")),
    ("Who wrote Romeo and Juliet?", "William Shakespeare",
     ("Charles Dickens", "Jane Austen", "Mark Twain")),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci",
     ("Michelangelo", "Pablo Picasso", "Vincent van Gogh")),
    ("Who developed the theory of relativity?", "Albert Einstein",
     ("Isaac Newton", "Niels Bohr", "Galileo Galilei")),
    ("Who was the first president of the United States?", "George Washington",
     ("Abraham Lincoln", "Thomas Jefferson", "John Adams")),
    ("Who discovered penicillin?", "Alexander Fleming",
     ("Louis Pasteur", "Marie Curie", "Robert Koch")),
    ("What is the chemical formula of water?", "H2O", ("CO2", "NaCl", "O2")),
    ("How many days are in a week?", "Seven", ("Five", "Six", "Eight")),
    ("How many legs does a spider have?", "Eight", ("Six", "Ten", "Four")),
    ("How many continents are there?", "Seven", ("Five", "Six", "Nine")),
    ("What is the largest ocean on Earth?", "The Pacific Ocean",
     ("The Atlantic Ocean", "The Indian Ocean", "The Arctic Ocean")),
    ("What is the tallest mountain in the world?", "Mount Everest",
     ("Mont Blanc", "Kilimanjaro", "Mount Fuji")),
    ("What is the longest river in Africa?", "The Nile", ("The Congo", "The Niger", "The Zambezi")),
    ("Which language is spoken in Brazil?", "Portuguese", ("Spanish", "French", "Italian")),
    ("What is the currency of Japan?", "The yen", ("The won", "The yuan", "The peso")),
    ("What do bees make?", "Honey", ("Milk", "Silk", "Butter")),
    ("What gas do plants absorb from the air?", "Carbon dioxide",
     ("Oxygen", "Helium", "Hydrogen")),
    ("What is the hardest natural substance?", "Diamond", ("Gold", "Iron", "Silver")),
    ("In which country are the pyramids of Giza?", "Egypt", ("Mexico", "Greece", "Peru")),
    ("In which city is the Eiffel Tower?", "Paris", ("London", "Rome", "Berlin")),
    ("What is the opposite of hot?", "Cold", ("Warm", "Wet", "Dry")),
    ("What color is the sky on a clear day?", "Blue", ("Green", "Red", "Yellow")),
    ("What is the largest animal on Earth?", "The blue whale",
     ("The elephant", "The giraffe", "The shark")),
    ("What is the freezing point of water in degrees Celsius?", "0 degrees",
     ("10 degrees", "50 degrees", "100 degrees")),
    ("What is the boiling point of water in degrees Celsius?", "100 degrees",
     ("50 degrees", "80 degrees", "150 degrees")),
    ("Which animal is known as the king of the jungle?", "The lion",
     ("The tiger", "The wolf", "The bear")),
    ("What is the largest country by area?", "Russia", ("Brazil", "India", "Mexico")),
)
