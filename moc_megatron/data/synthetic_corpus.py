"""A deterministic synthetic knowledge corpus: biographies of fictional people, plus question probes.

Every person has eight attributes (birth date, birth city, university, field of study, profession,
employer, favourite colour, hobby). Biographies state them in varied sentence templates and in shuffled
order; ``bios_per_person > 1`` writes several differently worded biographies of the same person.
Probes ask for each attribute with question and cloze templates that never occur in the corpus, so they
measure stored knowledge rather than memorised sentences. :func:`synthetic_chats` turns the same facts
into chat conversations for SFT tests. Everything depends only on the seed.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

FIRST_NAMES = (
    "Ada Alma Anselm Arvid Aurelia Basil Beatrix Bertil Calla Cassius Cilla Corin Dagny Darius Delphine Edda "
    "Elian Elske Emrys Esme Fenna Florin Freya Gideon Greta Halvard Hedda Idris Ilse Ines Ivo Jora Jovan Juno "
    "Kaspar Kirsi Leander Liesel Lorcan Lucan Maelle Magnus Marit Mireille Nadia Nils Noor Odile Oren Otto "
    "Petra Priya Quill Rafael Rhea Rosalind Saoirse Selim Silas Solveig Tamsin Teodor Thea Tobias Una Ulric "
    "Vesna Viggo Wren Xavi Yara Ysolde Zane Zofia"
).split()
LAST_NAMES = (
    "Abernethy Achterberg Alcott Ambrose Arkwright Ashdown Balfour Bellamy Birkeland Blackwood Brannigan "
    "Calloway Castellan Corrigan Dalgaard Delacroix Drummond Eastlake Ellingsen Fairbairn Falconer Fenwick "
    "Galbraith Garrow Hallorann Harrowgate Haverford Ingleby Jessop Kavanagh Kettering Lachance Lindqvist "
    "Lockwood Marchetti Moncrieff Nightingale Northcott Oakenfold Ostrander Pemberton Quenneville Ravenscroft "
    "Rochefort Saltonstall Sandoval Thackeray Thornquist Underhill Vanterpool Vasquez Wetherby Whitlock "
    "Winterbourne Yardley Zabrowski"
).split()
MIDDLE_INITIALS = tuple("ABCDEFGHJKLMNPRSTVW")
CITIES = (
    "Lisbon Porto Seville Valencia Lyon Marseille Bordeaux Ghent Antwerp Utrecht Leiden Bremen Leipzig Dresden "
    "Graz Salzburg Brno Krakow Gdansk Tallinn Riga Vilnius Turku Tampere Bergen Trondheim Aarhus Odense "
    "Gothenburg Uppsala Reykjavik Galway Cork Edinburgh Glasgow Cardiff Bristol York Bologna Turin Naples "
    "Palermo Trieste Split Ljubljana Sofia Thessaloniki Izmir Tbilisi Yerevan Almaty Kyoto Osaka Busan Taipei "
    "Hanoi Penang Perth Hobart Wellington Dunedin Quebec Halifax Winnipeg Calgary Portland Tucson Savannah "
    "Memphis Oaxaca Cordoba Valparaiso Cusco Recife Montevideo Nairobi Accra Dakar Tunis Fez"
).split()
UNIVERSITY_FORMS = (
    "University of {city}",
    "{city} Institute of Technology",
    "{city} Polytechnic",
    "Royal College of {city}",
)
MAJORS = (
    "mathematics|astronomy|marine biology|organic chemistry|medieval history|linguistics|architecture|"
    "economics|geology|philosophy|mechanical engineering|music theory|computer science|botany|statistics|"
    "civil engineering|archaeology|psychology|materials science|oceanography|comparative literature|"
    "ecology|neuroscience|cartography"
).split("|")
PROFESSIONS = (
    "cartographer|glassblower|patent attorney|marine engineer|veterinarian|librarian|software developer|"
    "bridge inspector|perfumer|air traffic controller|cheesemaker|violin maker|pharmacist|seismologist|"
    "typographer|actuary|beekeeper|sound engineer|translator|furniture restorer|meteorologist|"
    "tax auditor|botanical illustrator|locksmith|orthodontist|museum curator|urban planner|data analyst|"
    "ferry captain|textile designer"
).split("|")
EMPLOYERS = (
    "Brightwater Analytics|Copperleaf Systems|Northwind Shipping|Halcyon Optics|Ironbark Foundry|"
    "Bluefjord Energy|Marlow & Finch|Quillon Press|Saltmarsh Biologics|Tidewell Logistics|"
    "Kestrel Aeronautics|Old Mill Bakeries|Sunvale Cooperative|Granite Peak Insurance|"
    "Larkspur Pharmaceuticals|Emberline Studios|Westgate Civic Trust|Cobalt Ridge Mining|"
    "Foxglove Textiles|Harbourlight Ferries|Meridian Cartographics|Stonebridge Architects|"
    "Verdant Loop Farms|Orison Instruments|Palisade Security|Windrose Observatory|Amberfield Museum|"
    "Nimbus Weather Service|Juniper Lane Clinic|Rookery Records"
).split("|")
COLOURS = (
    "crimson|teal|ochre|lavender|emerald green|navy blue|amber|coral|indigo|mustard yellow|sage green|"
    "burgundy|turquoise|charcoal grey|magenta|ivory|olive|cobalt blue|peach|violet"
).split("|")
HOBBIES = (
    "bird watching|rock climbing|chess|pottery|sailing|origami|beekeeping|fencing|astrophotography|"
    "calligraphy|marathon running|bonsai|kayaking|woodcarving|birding by ear|amateur radio|orienteering|"
    "baking sourdough|cross-country skiing|knitting|archery|collecting stamps|playing the cello|"
    "restoring old clocks"
).split("|")
MONTHS = ("January|February|March|April|May|June|July|August|September|October|November|December").split("|")
PRONOUNS = {"she": ("She", "her"), "he": ("He", "his")}

ATTRIBUTES = (
    "birth_date",
    "birth_city",
    "university",
    "major",
    "profession",
    "employer",
    "favourite_colour",
    "hobby",
)

# Corpus templates: {S} is the subject (full name or pronoun), {P} its possessive, was "was"/"were".
CORPUS_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_date": (
        "{S} was born on {day} {month} {year}.",
        "{P} birthday is {month} {day}, and {S_lower} was born in {year}.",
        "{S} came into the world on {day} {month} {year}.",
        "The records show that {S_lower} was born on the {day_ord} of {month}, {year}.",
    ),
    "birth_city": (
        "{S} was born in {birth_city}.",
        "{S} grew up in {birth_city}, the city where {S_lower} was born.",
        "{P} hometown is {birth_city}.",
        "{birth_city} is where {S_lower} spent {p} childhood.",
    ),
    "university": (
        "{S} studied at the {university}.",
        "{S} graduated from the {university}.",
        "{P} degree is from the {university}.",
        "After school, {S_lower} enrolled at the {university}.",
    ),
    "major": (
        "{S} majored in {major}.",
        "{P} field of study was {major}.",
        "At university, {S_lower} focused on {major}.",
        "{S} earned a degree in {major}.",
    ),
    "profession": (
        "{S} works as {a_profession}.",
        "By profession, {S_lower} is {a_profession}.",
        "{S} earns a living as {a_profession}.",
        "{S} has made a career as {a_profession}.",
    ),
    "employer": (
        "{S} is employed by {employer}.",
        "{S} works for {employer}.",
        "{P} employer is {employer}.",
        "{employer} is the company where {S_lower} works.",
    ),
    "favourite_colour": (
        "{P} favourite colour is {favourite_colour}.",
        "{S} likes the colour {favourite_colour} more than any other.",
        "Of all colours, {S_lower} prefers {favourite_colour}.",
        "{S} would always pick {favourite_colour} as {p} favourite colour.",
    ),
    "hobby": (
        "In {p} free time, {S_lower} enjoys {hobby}.",
        "{P} favourite hobby is {hobby}.",
        "{S} spends weekends on {hobby}.",
        "{S} has a passion for {hobby}.",
    ),
}

# Probe templates never used in the corpus: (question, cloze prompt).
PROBE_TEMPLATES: dict[str, tuple[str, str]] = {
    "birth_date": ("On what date was {name} born?", "{name}'s date of birth is"),
    "birth_city": ("In which city was {name} born?", "The city of birth of {name} is"),
    "university": ("Which university did {name} attend?", "The university that {name} attended is"),
    "major": ("What did {name} study?", "The subject {name} studied is"),
    "profession": ("What is {name}'s profession?", "The occupation of {name} is"),
    "employer": ("Which company employs {name}?", "The name of {name}'s employer is"),
    "favourite_colour": ("What is {name}'s favourite colour?", "The colour {name} likes best is"),
    "hobby": ("What is {name}'s hobby?", "The pastime {name} enjoys most is"),
}


@dataclass(frozen=True)
class Person:
    """A fictional person and their attributes."""

    name: str
    pronoun: str
    birth_day: int
    birth_month: str
    birth_year: int
    birth_city: str
    university: str
    major: str
    profession: str
    employer: str
    favourite_colour: str
    hobby: str

    def value(self, attribute: str) -> str:
        """The answer string for ``attribute``."""
        if attribute == "birth_date":
            return f"{self.birth_day} {self.birth_month} {self.birth_year}"
        if attribute == "university":
            return f"the {self.university}"
        return str(getattr(self, attribute))


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def generate_people(count: int, seed: int = 0) -> list[Person]:
    """``count`` people with unique names and random attributes; the same seed gives the same people."""
    rng = random.Random(seed)
    names = [f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES]
    if count > len(names):
        names += [f"{first} {m}. {last}" for m in MIDDLE_INITIALS for first in FIRST_NAMES for last in LAST_NAMES]
    if count > len(names):
        raise ValueError(f"at most {len(names)} unique people can be generated, asked for {count}")
    chosen = rng.sample(names, count)
    people = []
    for name in chosen:
        city = rng.choice(CITIES)
        people.append(
            Person(
                name=name,
                pronoun=rng.choice(("she", "he")),
                birth_day=rng.randint(1, 28),
                birth_month=rng.choice(MONTHS),
                birth_year=rng.randint(1920, 2004),
                birth_city=city,
                university=rng.choice(UNIVERSITY_FORMS).format(city=rng.choice(CITIES)),
                major=rng.choice(MAJORS),
                profession=rng.choice(PROFESSIONS),
                employer=rng.choice(EMPLOYERS),
                favourite_colour=rng.choice(COLOURS),
                hobby=rng.choice(HOBBIES),
            )
        )
    return people


def _sentence(person: Person, attribute: str, template: str, use_name: bool) -> str:
    subject_pronoun, possessive = PRONOUNS[person.pronoun]
    subject = person.name if use_name else subject_pronoun
    fields = asdict(person)
    sentence = template.format(
        S=subject,
        S_lower=person.name if use_name else subject_pronoun.lower(),
        P=f"{person.name}'s" if use_name else possessive.capitalize(),
        p=possessive,
        day=person.birth_day,
        day_ord=_ordinal(person.birth_day),
        month=person.birth_month,
        year=person.birth_year,
        a_profession=("an " if person.profession[0] in "aeiou" else "a ") + person.profession,
        **{k: v for k, v in fields.items() if k not in ("name", "pronoun")},
    )
    return sentence[0].upper() + sentence[1:]


def biography(person: Person, rng: random.Random) -> str:
    """One biography stating every attribute once, with random templates and sentence order."""
    order = list(ATTRIBUTES)
    rng.shuffle(order)
    sentences = []
    for i, attribute in enumerate(order):
        template = rng.choice(CORPUS_TEMPLATES[attribute])
        use_name = i == 0 or rng.random() < 0.3
        sentences.append(_sentence(person, attribute, template, use_name))
    return " ".join(sentences)


def corpus_documents(people: Sequence[Person], bios_per_person: int = 1, seed: int = 0) -> Iterator[dict[str, str]]:
    """Biography documents ``{"id", "text"}`` in a seeded shuffled order."""
    rng = random.Random(seed + 1)
    docs = []
    for index, person in enumerate(people):
        for variant in range(bios_per_person):
            docs.append({"id": f"person{index:06d}-bio{variant}", "text": biography(person, rng)})
    rng.shuffle(docs)
    yield from docs


def probes(people: Sequence[Person]) -> Iterator[dict[str, str]]:
    """One question/cloze probe per person and attribute, worded unlike any corpus sentence."""
    for index, person in enumerate(people):
        for attribute in ATTRIBUTES:
            question, prompt = PROBE_TEMPLATES[attribute]
            answer = person.value(attribute)
            yield {
                "id": f"person{index:06d}-{attribute}",
                "person": person.name,
                "attribute": attribute,
                "question": question.format(name=person.name),
                "answer": answer,
                "prompt": prompt.format(name=person.name),
                "completion": " " + answer,
            }


SYSTEM_PROMPTS = (
    "You answer questions about people in the registry. Be brief.",
    "You are a helpful assistant with access to biographical records.",
)


def synthetic_chats(people: Sequence[Person], count: int, seed: int = 0) -> Iterator[dict[str, list[dict[str, str]]]]:
    """``count`` chat conversations ``{"messages": [...]}`` with 1 to 3 question/answer turns each."""
    rng = random.Random(seed + 2)
    for _ in range(count):
        person = rng.choice(people)
        messages: list[dict[str, str]] = []
        if rng.random() < 0.5:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for attribute in rng.sample(ATTRIBUTES, rng.randint(1, 3)):
            question = PROBE_TEMPLATES[attribute][0].format(name=person.name)
            template = rng.choice(CORPUS_TEMPLATES[attribute])
            messages.append({"role": "user", "content": question})
            messages.append({"role": "assistant", "content": _sentence(person, attribute, template, True)})
        yield {"messages": messages}
