"""The answer benchmark's own invented facts, in five kinds, and the corpus they hide in.

Every fact here is made up (no public QA set), so the model cannot know it: an answer is right only
when the fact reached the prompt. They sit among real wiki100 articles (distractors); needles are
buried in ~5,000 characters of real wiki100 text; rare-name documents share one template, so only
the name tells them apart; update documents are re-ingested with one fact changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SHORT, NEEDLE, RARE, UPDATE, UNANSWERABLE = "short", "needle", "rare_name", "update", "unanswerable"
KINDS = (SHORT, NEEDLE, RARE, UPDATE, UNANSWERABLE)

# Real articles the needles are buried in (one each), and the distractor articles: disjoint, so no
# distractor repeats a needle document's text.
NEEDLE_FILLERS = ("Geology", "Earth", "Architecture", "Music", "Transport", "Agriculture", "Astronomy", "Trade",
                  "Sport", "Medicine", "Writing", "Water")
DISTRACTORS = ("Engineering", "Geography", "Technology", "Tool", "Manufacturing", "Home", "Country", "Government",
               "Business", "Sea", "City", "Book", "Moon", "Culture", "Fire", "Plant", "Clothing", "Family")


@dataclass(frozen=True)
class Item:
    id: str
    kind: str
    question: str
    answers: tuple[str, ...]  # any one of these in the answer makes it correct (empty: must abstain)
    gold_document: str  # the document that answers it (unanswerable: the nearest one, given to the gold arm)
    stale: tuple[str, ...] = ()  # update: the old value, which must never come back
    gold_passage: str = ""  # filled in by build_corpus: the passage the gold arm is handed


@dataclass
class Corpus:
    documents: dict[str, str]  # id -> text, as first ingested
    updated: dict[str, str]  # id -> new text, re-ingested under the same id
    items: list[Item] = field(default_factory=list)


# --- short facts: one small document each; a few invented siblings share their vocabulary ------------------

_SHORT = [
    ("fact-marrowind", "The Marrowind Lantern Festival takes place every October in the harbour town of Pellico. "
     "Families float paper boats carrying candles across the bay. The festival began in 1712, after a storm "
     "spared the fishing fleet.",
     "In which month does the Marrowind Lantern Festival take place?", ("October",)),
    ("fact-velmora", "Velmora is a small island nation in the Sunless Sea. Its capital city is Ostrel, a port "
     "founded in 1642. The national animal of Velmora is the blue heron.",
     "What is the capital city of Velmora?", ("Ostrel",)),
    ("fact-brannock", "The Brannock process turns crushed seaweed into a clear, durable plastic. It was invented "
     "in 1931 by Edith Sorrel, a chemist from the port of Gannet Bay.",
     "Who invented the Brannock process?", ("Edith Sorrel",)),
    ("fact-quillfish", "The quillfish is a freshwater fish found only in Lake Tamsa. It grows to about 40 "
     "centimetres and feeds on snails at night.",
     "In which lake is the quillfish found?", ("Tamsa",)),
    ("fact-orvane", "The Orvane Bridge crosses the river Dusk at the city of Harlow Vale. Completed in 1897, it "
     "is 412 metres long and was the first steel bridge in the province.",
     "How long is the Orvane Bridge?", ("412",)),
    ("fact-saltmoss", "Saltmoss tea is brewed from a grey lichen that grows on coastal cliffs. It is "
     "traditionally sweetened with juniper honey and served after funerals.",
     "What is saltmoss tea traditionally sweetened with?", ("juniper honey",)),
    ("fact-kestrel-cup", "The Kestrel Cup is a rowing race held each spring on the river Ambry. The 2019 race "
     "was won by the crew from Fenwick College, who finished in 17 minutes and 2 seconds.",
     "Which crew won the 2019 Kestrel Cup?", ("Fenwick",)),
    ("fact-dorrin", "The Dorrin violin was built by the luthier Mattias Greve in 1764. It is kept in the museum "
     "of Castel Rondo and is played in public once a year.",
     "Who built the Dorrin violin?", ("Mattias Greve",)),
    ("fact-pemberly", "Comet Pemberly returns to the inner Solar System every 83 years. It was last seen in "
     "1961 and is named after the astronomer Ruth Pemberly.",
     "How often does Comet Pemberly return to the inner Solar System?", ("83 years", "83-year")),
    ("fact-ironleaf", "Ironleaf is a hardy shrub whose leaves give the blue dye called tavel. Dyers in the "
     "village of Onsk soak the leaves in lime water for nine days.",
     "Which dye is made from ironleaf?", ("tavel",)),
    ("fact-harrowgate", "The Harrowgate Library holds 2.3 million books. It was designed by the architect Lise "
     "Amberton and opened to the public in 1908.",
     "Who designed the Harrowgate Library?", ("Lise Amberton", "Amberton")),
    ("fact-glimmer-sheep", "The glimmer sheep is a breed raised on the island of Corrach. Its wool has a natural "
     "silver sheen and is woven into a cloth called corrach twill.",
     "On which island is the glimmer sheep raised?", ("Corrach",)),
]
# Siblings: answer nothing, but look like the facts above (the wrong passage a careless pick would cite).
_SIBLINGS = {
    "fact-hollin": "The Hollin Fire Festival takes place every June in the hill town of Bray Essen. Dancers "
    "carry burning torches through the streets. The festival began in 1820.",
    "fact-tarsk": "Tarsk is a small island nation in the Northern Reach. Its capital city is Mirrow, a port "
    "founded in 1710. The national animal of Tarsk is the grey seal.",
    "fact-lindqvist": "The Lindqvist process turns pine bark into a strong glue. It was invented in 1902 by Otto "
    "Brenner, an engineer from the town of Halden.",
    "fact-sallow-bridge": "The Sallow Bridge crosses the river Wend at the town of Corby Mere. Completed in 1921, "
    "it is 268 metres long and was the first concrete bridge in the county.",
}

# --- needles: one invented sentence in ~5,000 characters of a real article ---------------------------------

_NEEDLES = [
    ("report-tarrow", "Geology", "The survey team of the Tarrow Quarry stores its core samples in Vault 7 of "
     "the Kessing Institute.",
     "Where does the Tarrow Quarry survey team store its core samples?", ("Vault 7",)),
    ("report-ilvar", "Earth", "The weather station on Mount Ilvar recorded its lowest temperature, minus 41 "
     "degrees Celsius, on 3 February 1956.",
     "What was the lowest temperature recorded by the weather station on Mount Ilvar?", ("41",)),
    ("report-selwyn", "Architecture", "The spiral staircase of the Selwyn Tower has exactly 1,204 steps.",
     "How many steps does the spiral staircase of the Selwyn Tower have?", ("1,204", "1204")),
    ("report-voss", "Music", "The composer Anneliese Voss wrote her Harbour Symphony for forty-two players and "
     "a ship's foghorn.",
     "Which unusual instrument does Anneliese Voss's Harbour Symphony call for?", ("foghorn",)),
    ("report-grelling", "Transport", "The night train of the Grelling Railway between Ostmark and Linnet takes "
     "eleven hours.",
     "How long does the Grelling Railway's night train between Ostmark and Linnet take?",
     ("eleven hours", "11 hours")),
    ("report-wenholt", "Agriculture", "The bakers of Wenholt flavour their midsummer bread with crushed fennel "
     "seed and orange peel.",
     "What do the bakers of Wenholt flavour their midsummer bread with?", ("fennel",)),
    ("report-halvorsen", "Astronomy", "The main telescope of the Halvorsen Observatory has a mirror 3.2 metres "
     "across.",
     "How wide is the mirror of the Halvorsen Observatory's main telescope?", ("3.2",)),
    ("report-corvin", "Trade", "The Corvin Trading Company paid its sailors in salt until 1803.",
     "What did the Corvin Trading Company pay its sailors in?", ("salt",)),
    ("report-brisa", "Sport", "The Brisa Open tennis tournament is played on courts of crushed blue shale.",
     "What are the courts of the Brisa Open tennis tournament made of?", ("shale",)),
    ("report-ardent", "Medicine", "The Ardent Clinic in Morrow Bay makes its snakebite antivenom from the blood "
     "of alpacas.",
     "From which animal's blood does the Ardent Clinic make its snakebite antivenom?", ("alpaca",)),
    ("report-codex", "Writing", "The Green Codex was copied by the scribe Odo of Varnholm in the year 1140.",
     "Which scribe copied the Green Codex?", ("Odo",)),
    ("report-lissom", "Water", "The Lissom Reservoir holds 86 million cubic metres of water and supplies the "
     "city of Dreyport.",
     "Which city does the Lissom Reservoir supply?", ("Dreyport",)),
]

# --- rare names: one template, so only the (rare) name tells the documents apart --------------------------

_RARE = [
    ("person-quarrington", "Ysolde Quarrington", "cartographer", "drew the Tidewater Atlas",
     "What did Ysolde Quarrington create?", ("Tidewater Atlas",)),
    ("person-ekwueme-strand", "Bartholomew Ekwueme-Strand", "engineer", "designed the Calloway Dam",
     "What did Bartholomew Ekwueme-Strand design?", ("Calloway Dam",)),
    ("person-zanetti-morrow", "Philippa Zanetti-Morrow", "botanist", "discovered the moon lily",
     "What did Philippa Zanetti-Morrow discover?", ("moon lily",)),
    ("person-vantongeren", "Idris Vantongeren", "architect", "designed the Glasshouse Theatre",
     "Which building did Idris Vantongeren design?", ("Glasshouse Theatre",)),
    ("person-thistlewood", "Oksana Thistlewood", "composer", "wrote the opera The Salt Queen",
     "Which opera did Oksana Thistlewood write?", ("Salt Queen",)),
    ("person-oyelaran", "Caspian Oyelaran", "shipbuilder", "built the schooner Grey Petrel",
     "Which ship did Caspian Oyelaran build?", ("Grey Petrel",)),
    ("person-achterberg", "Marisol Achterberg", "astronomer", "discovered the asteroid Wenlock",
     "Which asteroid did Marisol Achterberg discover?", ("Wenlock",)),
    ("person-nkemelu", "Teodor Fairweather-Nkemelu", "inventor", "invented the pneumatic letter sorter",
     "What did Teodor Fairweather-Nkemelu invent?", ("letter sorter",)),
    ("person-solvang", "Henrike Solvang", "painter", "painted The Drowned Orchard",
     "Which painting is Henrike Solvang known for?", ("Drowned Orchard",)),
    ("person-ferreira-holt", "Lucan Ferreira-Holt", "chemist", "first made the pigment kessel blue",
     "Which pigment did Lucan Ferreira-Holt first make?", ("kessel blue",)),
    ("person-oduya", "Wilhelmina Oduya", "novelist", "wrote the novel The Lamplighter's Daughter",
     "Which novel did Wilhelmina Oduya write?", ("Lamplighter's Daughter", "Lamplighter’s Daughter")),
    ("person-ashgrove-mbeki", "Evander Ashgrove-Mbeki", "navigator", "founded the Lowmoor School of Navigation",
     "Which school did Evander Ashgrove-Mbeki found?", ("Lowmoor",)),
]


def _rare_text(name: str, profession: str, work: str, i: int) -> str:
    return (f"The {profession} {name} {work} in {1790 + 7 * i}. Like many of the guild's members, "
            f"{name.split()[0]} was born in the river town of Ebbing and trained at the guild hall there. "
            f"The guild's records list {name} among its most honoured members.")


# --- updates: ingested, then re-ingested with one fact changed (same id) ------------------------------------

_UPDATES = [
    ("notice-ferry", "The ferry from Castmoor to Innisk leaves at {} every morning. Tickets are sold on board, "
     "and bicycles travel free.", "7:15", "9:40",
     "At what time does the morning ferry from Castmoor to Innisk leave?"),
    ("notice-soil-lab", "The Dunmore Soil Laboratory is led by Dr. {}. The laboratory tests farm soil for "
     "nitrogen and publishes a yearly report.", "Miriam Tolle", "Anselm Reyes",
     "Who leads the Dunmore Soil Laboratory?"),
    ("notice-kelby", "A day pass for the Kelby Botanical Garden costs {} crowns. The garden's glasshouse is "
     "closed on Mondays.", "14", "19",
     "How many crowns does a day pass for the Kelby Botanical Garden cost?"),
    ("notice-owls", "The mascot of the Riverton Owls hockey team is a snowy owl named {}. The team plays its "
     "home games at the Larch Arena.", "Pip", "Clover",
     "What is the name of the Riverton Owls' mascot?"),
    ("notice-aldwick", "The Aldwick town council meets on the first {} of each month. Meetings are open to "
     "the public and begin at 6 pm.", "Tuesday", "Thursday",
     "On which day of the week does the Aldwick town council meet?"),
    ("notice-greymarch", "Greymarch Stadium seats {} spectators. It is the home ground of the Greymarch "
     "Rovers football club.", "18,000", "24,500",
     "How many spectators does Greymarch Stadium seat?"),
    ("notice-sable", "The headquarters of the Sable Line shipping company is in {}. The company runs cargo "
     "ships along the northern coast.", "Port Averne", "Kildare Sound",
     "Where is the headquarters of the Sable Line shipping company?"),
    ("notice-tovey", "The house soup of the Tovey Inn is made with {}. The inn has served travellers on the "
     "coast road since 1790.", "leeks and barley", "pumpkin and chestnuts",
     "What is the Tovey Inn's house soup made with?"),
]
_UPDATE_MATCH = {"18,000": ("18,000", "18000"), "24,500": ("24,500", "24500"),
                 "leeks and barley": ("leek", "barley"), "pumpkin and chestnuts": ("pumpkin", "chestnut"),
                 "Miriam Tolle": ("Tolle",), "Anselm Reyes": ("Reyes",)}

# --- unanswerable: the nearest document is in the collection but does not say -----------------------------

_UNANSWERABLE = [
    ("fact-velmora", "What is the population of Velmora?"),
    ("fact-marrowind", "How much does a ticket to the Marrowind Lantern Festival cost?"),
    ("fact-orvane", "Who was the chief engineer of the Orvane Bridge?"),
    ("fact-quillfish", "What colour is the quillfish?"),
    ("fact-kestrel-cup", "Which crew won the 2021 Kestrel Cup?"),
    ("person-quarrington", "Who was Ysolde Quarrington's teacher?"),
    ("fact-ironleaf", "How many people live in the village of Onsk?"),
    ("fact-dorrin", "How much is the Dorrin violin insured for?"),
    ("report-halvorsen", "In which year was the Halvorsen Observatory founded?"),
    ("fact-harrowgate", "Who is the head librarian of the Harrowgate Library?"),
]

_NEEDLE_CHARS = 5000


def _needle_document(filler: str, needle: str) -> tuple[str, str]:
    """~5,000 characters of an article's prose lines with the needle appended to a line past the middle;
    returns (document, the line holding the needle: the gold passage)."""
    lines = [line for line in filler.split("\n") if 200 <= len(line) <= 2000 and not line.startswith("*")]
    kept, size = [], 0
    for line in lines:
        if size >= _NEEDLE_CHARS:
            break
        kept.append(line)
        size += len(line) + 1
    at = (len(kept) * 3) // 5
    kept[at] = f"{kept[at]} {needle}"
    return "\n".join(kept), kept[at]


def build_corpus(articles: dict[str, str], distractors: int) -> Corpus:
    """The documents to ingest (distractors first) and every question with its gold passage."""
    docs = {title: articles[title] for title in DISTRACTORS[:distractors]}
    items: list[Item] = []
    passages: dict[str, str] = {}  # the gold passage of each document (a needle's: its paragraph)
    for i, (doc_id, text, question, answers) in enumerate(_SHORT):
        docs[doc_id] = text
        items.append(Item(f"short-{i + 1}", SHORT, question, answers, doc_id, gold_passage=text))
    docs.update(_SIBLINGS)
    for i, (doc_id, filler, needle, question, answers) in enumerate(_NEEDLES):
        docs[doc_id], passage = _needle_document(articles[filler], needle)
        passages[doc_id] = passage
        items.append(Item(f"needle-{i + 1}", NEEDLE, question, answers, doc_id, gold_passage=passage))
    for i, (doc_id, name, profession, work, question, answers) in enumerate(_RARE):
        docs[doc_id] = _rare_text(name, profession, work, i)
        items.append(Item(f"rare-{i + 1}", RARE, question, answers, doc_id, gold_passage=docs[doc_id]))
    updated = {}
    for i, (doc_id, template, old, new, question) in enumerate(_UPDATES):
        docs[doc_id] = template.format(old)
        updated[doc_id] = template.format(new)
        items.append(Item(f"update-{i + 1}", UPDATE, question, _UPDATE_MATCH.get(new, (new,)), doc_id,
                          stale=_UPDATE_MATCH.get(old, (old,)), gold_passage=updated[doc_id]))
    for i, (near, question) in enumerate(_UNANSWERABLE):
        items.append(Item(f"unanswerable-{i + 1}", UNANSWERABLE, question, (), near,
                          gold_passage=passages.get(near, docs[near])))
    return Corpus(docs, updated, items)
