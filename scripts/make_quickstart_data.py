#!/usr/bin/env python3
"""Build the quickstart "pirate" instruction dataset.

The data teaches a small chat model (SmolLM2-135M-Instruct) one behaviour that
is easy to spot after a short QLoRA run: it answers every question in pirate
speak, starting with "Arr! " and ending with " Yo ho ho!", while the single
sentence in between is still a short, correct answer. Rows mix alpaca and chat
(some two-turn) records so both loader paths are exercised. The questions in
pirate_heldout.txt are kept out of the data: ask the trained model those to see
the style generalise rather than be recalled.

Built deterministically from the hand-written tables below (standard library,
random.Random(0)). Regenerate with:

    python scripts/make_quickstart_data.py [--out recipes/data/pirate.jsonl]
"""
import argparse
import json
import random
import re
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "recipes" / "data" / "pirate.jsonl"

HELDOUT = ["What is the capital of Japan?", "What is 9 plus 4?", "What sound does a duck make?",
           "What is the opposite of hot?", "Give me a tip for staying healthy."]
# Exact-match exclusion is not enough: a rephrasing in the data ("Name the
# capital of Japan.") would make the held-out check meaningless, so the topics
# themselves are banned from every training question.
HELDOUT_BANNED = [r"\bjapan", r"\bducks?\b", r"\bducklings?\b", r"\bhot\b", r"\bcold\b",
                  r"\bhealth", r"\b(9|nine)\b.*\b(4|four)\b", r"\b(4|four)\b.*\b(9|nine)\b"]


def table(text):
    """Parse 'a = b; c = d; ...' into tuples; keeps the fact tables compact."""
    return [tuple(p.strip() for p in item.split("=")) for item in text.split(";") if item.strip()]


# Only capitals that are uncontested and not mid-move (no Bolivia, South
# Africa, Netherlands, Indonesia, Egypt, ...), so no answer is arguable.
CAPITALS = table("""
France=Paris; Germany=Berlin; Italy=Rome; Spain=Madrid; Portugal=Lisbon; the United Kingdom=London;
Ireland=Dublin; Belgium=Brussels; Austria=Vienna; Poland=Warsaw; the Czech Republic=Prague;
Hungary=Budapest; Greece=Athens; Sweden=Stockholm; Norway=Oslo; Denmark=Copenhagen; Finland=Helsinki;
Iceland=Reykjavik; Russia=Moscow; Ukraine=Kyiv; Romania=Bucharest; Bulgaria=Sofia; Serbia=Belgrade;
Croatia=Zagreb; Kenya=Nairobi; Nigeria=Abuja; Ethiopia=Addis Ababa; Morocco=Rabat;
Ghana=Accra; Senegal=Dakar; China=Beijing; India=New Delhi; South Korea=Seoul; Thailand=Bangkok;
Vietnam=Hanoi; the Philippines=Manila; Pakistan=Islamabad; Bangladesh=Dhaka; Nepal=Kathmandu;
Iran=Tehran; Iraq=Baghdad; Saudi Arabia=Riyadh; Turkey=Ankara; Afghanistan=Kabul; Mongolia=Ulaanbaatar;
Lebanon=Beirut; Jordan=Amman; Qatar=Doha; Cambodia=Phnom Penh; Laos=Vientiane; Australia=Canberra;
New Zealand=Wellington; Canada=Ottawa; Mexico=Mexico City; Cuba=Havana; Jamaica=Kingston;
Argentina=Buenos Aires; Brazil=Brasilia; Chile=Santiago; Peru=Lima; Colombia=Bogota;
Venezuela=Caracas; Ecuador=Quito; Uruguay=Montevideo; Paraguay=Asuncion
""")
CAPITAL_Q = ["What is the capital of {c}?", "What's the capital city of {c}?",
             "Which city is the capital of {c}?", "Name the capital of {c}.",
             "Tell me the capital of {c}.", "Do you know the capital of {c}?"]
CAPITAL_A = ["the capital o' {c} be {x}", "{x} be the capital o' {c}",
             "the capital city o' {c} be {x}, so set yer course there"]

COLOURS = table("""
the sky on a clear day=blue; grass=green; snow=white; coal=black; a ripe tomato=red; a carrot=orange;
a lemon=yellow; a ripe banana=yellow; milk=white; a crow=black; a flamingo=pink; an eggplant=purple;
a pumpkin=orange; milk chocolate=brown; a ripe strawberry=red; a lime=green; a lump of charcoal=black
""")
COLOUR_Q = ["What colour is {t}?", "What color is {t}?", "Tell me the colour of {t}."]
MIXES = table("blue and yellow=green; red and white=pink; red and yellow=orange; "
              "red and blue=purple; black and white=grey")

SOUNDS = table("""
dog=barks and goes woof; cat=meows and purrs; cow=moos; sheep=bleats and goes baa; pig=oinks;
horse=neighs; lion=roars; owl=hoots; snake=hisses; donkey=brays and goes hee-haw;
rooster=crows cock-a-doodle-doo; frog=croaks; wolf=howls; bee=buzzes; mouse=squeaks; elephant=trumpets
""")
SOUND_Q = ["What sound does {a} make?", "What noise does {a} make?", "What does {a} say?"]
YOUNG = table("""
dog=puppy; cat=kitten; cow=calf; horse=foal; sheep=lamb; goat=kid; pig=piglet; frog=tadpole;
kangaroo=joey; bear=cub; lion=cub; deer=fawn; swan=cygnet; owl=owlet; goose=gosling; eagle=eaglet
""")
YOUNG_Q = ["What is a baby {a} called?", "What do you call a young {a}?",
           "What's the name for a baby {a}?"]

# Only pairs with one obvious answer ("light" could be dark or heavy, so it is
# never asked, only given as an answer).
OPPOSITES = table("""
big=small; up=down; happy=sad; dark=light; open=closed; fast=slow; early=late; full=empty; wet=dry;
loud=quiet; hard=soft; tall=short; inside=outside; left=right; day=night; push=pull; win=lose;
thick=thin; heavy=light; strong=weak; rich=poor; clean=dirty; above=below; buy=sell; true=false;
always=never; north=south; east=west; first=last; remember=forget; asleep=awake; entrance=exit;
smooth=rough; cheap=expensive; near=far; question=answer
""")
OPPOSITE_Q = ["What is the opposite of {w}?", 'What\'s the opposite of "{w}"?',
              "Give me the opposite of the word {w}.", "Name a word that means the opposite of {w}."]

DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
MONTHS = "January February March April May June July August September October November December".split()
MONTH_DAYS = dict(zip(MONTHS, [31, 0, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]))  # 0: February

# Free-form facts as "question = answer core"; questions are already varied by hand.
FACTS = {
    "planets": table("""
How many planets are in our Solar System? = there be eight planets in our Solar System;
What is the largest planet in the Solar System? = Jupiter be the largest planet in the Solar System;
Which planet is the smallest? = Mercury be the smallest planet o' the eight;
Which planet is closest to the Sun? = Mercury sails closest to the Sun;
Which planet is farthest from the Sun? = Neptune be the planet farthest from the Sun;
Which planet is called the Red Planet? = Mars be the Red Planet, rusty as an old anchor;
Which planet do we live on? = we all live on the planet Earth;
Which planet is famous for its rings? = Saturn be the planet famous for its grand rings;
What is the hottest planet? = Venus be the hottest planet, thanks to its thick, heat-trappin' air;
Which planet seems to spin on its side? = Uranus be the planet that spins tipped over on its side;
Which planet has the Great Red Spot? = Jupiter carries the Great Red Spot, a giant storm;
Which planet is often called Earth's twin? = Venus be called Earth's twin fer bein' nearly the same size;
Is Pluto a planet? = Pluto be a dwarf planet now, not a full planet;
What is the Sun? = the Sun be a star, the closest one to Earth;
How many moons does Earth have? = Earth has just one moon;
How many moons does Mars have? = Mars has two small moons, Phobos and Deimos;
How long does Earth take to go around the Sun? = Earth takes about one year to sail around the Sun;
How long does sunlight take to reach Earth? = sunlight takes about eight minutes to reach Earth
"""),
    "science": table("""
What gas do we need to breathe to stay alive? = we need to breathe oxygen to stay alive;
What gas do we breathe out? = we breathe out carbon dioxide;
What do plants need to make their food? = plants need sunlight, water and carbon dioxide to make food;
At what temperature does water boil in Celsius? = water boils at one hundred degrees Celsius at sea level;
At what temperature does water freeze in Celsius? = water freezes at zero degrees Celsius;
What is the boiling point of water in Fahrenheit? = it be two hundred and twelve degrees Fahrenheit;
What is frozen water called? = frozen water be called ice;
What is water made of? = water be made o' hydrogen and oxygen;
What force makes things fall to the ground? = gravity be the force that pulls things down;
What is the largest mammal? = the blue whale be the largest mammal on land or sea;
What is the fastest land animal? = the cheetah be the fastest animal on land;
What is the tallest animal? = the giraffe be the tallest animal alive;
How many bones does an adult human have? = a grown human has two hundred and six bones;
Which organ pumps blood around the body? = the heart pumps blood around yer body;
Which organs do we use to breathe? = we breathe with our two lungs;
What is the largest organ of the human body? = yer skin be the largest organ o' the body;
What do bees make? = bees make honey and beeswax;
What does a caterpillar turn into? = a caterpillar turns into a butterfly or a moth;
What is the hardest natural substance? = diamond be the hardest natural substance;
What are the three common states of matter? = they be solid, liquid and gas;
What does a thermometer measure? = a thermometer measures temperature;
Which way does a compass needle point? = a compass needle points to magnetic north;
What makes a rainbow? = sunlight bent and split by raindrops makes a rainbow;
Which metal is liquid at room temperature? = mercury be the metal that stays liquid at room temperature;
What do you call an animal that eats only plants? = an animal that eats only plants be a herbivore;
What do you call an animal that eats only meat? = an animal that eats only meat be a carnivore;
What is an animal that eats both plants and meat called? = an animal that eats both be an omnivore;
Is a whale a fish? = no, a whale be a mammal that breathes air;
Is a spider an insect? = no, a spider be an arachnid, not an insect;
Is a bat a bird? = no, a bat be a mammal, though it flies;
What causes the seasons on Earth? = the seasons come from the tilt o' Earth's axis;
What mainly causes the tides? = the tides be caused mainly by the pull o' the Moon;
What is it called when liquid water turns into vapour? = that be called evaporation;
What is it called when water vapour turns back into liquid? = that be called condensation;
What is the most common gas in Earth's air? = nitrogen be the most common gas in the air;
Can sound travel through space? = no, sound cannot travel through the empty vacuum o' space;
Do opposite poles of magnets attract or repel? = opposite poles o' magnets attract each other;
What is the largest ocean on Earth? = the Pacific be the largest ocean on Earth;
What is the largest continent? = Asia be the largest continent;
What is the tallest mountain above sea level? = Mount Everest be the tallest mountain above sea level;
What is the largest desert in Africa? = the Sahara be the largest desert in Africa;
How many colours are in a rainbow? = a rainbow be said to have seven colours;
How many players does a soccer team have on the field? = a soccer team has eleven players on the field;
How many cards are in a standard deck? = a standard deck has fifty-two cards, not countin' jokers
"""),
}
ELEMENTS = table("gold=Au; silver=Ag; iron=Fe; sodium=Na; oxygen=O; hydrogen=H; carbon=C; helium=He")
# Planet order is generated so the ordinal facts cannot drift from the list.
PLANETS = "Mercury Venus Earth Mars Jupiter Saturn Uranus Neptune".split()
ORDINALS = "first second third fourth fifth sixth seventh eighth".split()

# "How many <last word> does <thing> have?" / "How many <last word> are in <thing>?"
COUNT_HAS = table("""
a triangle=three sides; a square=four sides; a pentagon=five sides; a hexagon=six sides;
an octagon=eight sides; a spider=eight legs; an insect=six legs; an octopus=eight arms; a bird=two legs;
a bicycle=two wheels; a tricycle=three wheels; a standard guitar=six strings; a standard piano=eighty-eight keys
""")
COUNT_IN = table("""
a day=twenty-four hours; an hour=sixty minutes; a minute=sixty seconds; a week=seven days;
a year=twelve months; a leap year=three hundred and sixty-six days; a metre=one hundred centimetres;
a kilogram=one thousand grams; a dozen=twelve things; a century=one hundred years; a decade=ten years;
a millennium=one thousand years
""")

HOWTO = table("""
boil an egg=lower it into boilin' water and cook it about nine minutes fer a firm yolk;
make a cup of tea=pour boilin' water over a tea bag, steep three minutes, then take the bag out;
tie my shoelaces=cross the laces, make two loops and pull 'em snug into a bow;
fall asleep faster=keep a regular bedtime, dim the lights and put yer screens away;
wash my hands properly=scrub with soap and warm water fer twenty seconds, then rinse and dry;
save money=set aside a bit o' every payday before ye spend any of it;
remember things better=review a little each day instead o' crammin' it all at once;
make a paper airplane=fold a sheet in half, fold the top corners in, then fold down the wings;
plant a seed=push it into damp soil about twice its own depth, then water it;
keep houseplants alive=give 'em good light and water only when the topsoil feels dry;
stop a nosebleed=sit up, lean forward and pinch the soft part o' yer nose fer ten minutes;
get more done in a day=write a short task list each mornin' and tackle the biggest one first;
unclog a sink=try a plunger first, then flush it with baking soda, vinegar and hot water;
write a good email=use a clear subject line, keep it short and say what ye need up front;
make friends in a new town=join a club that matches yer interests and say yes to invitations;
prepare for a job interview=research the company, practise common questions and arrive a few minutes early;
study for an exam=study in short sessions over several days and quiz yerself instead o' rereadin';
cook rice=simmer one cup o' rice in about two cups o' water, lid on, till the water be gone;
change a light bulb=switch off the power, let the old bulb cool, then swap in a new one;
learn a new language=practise a little every day and talk with native speakers when ye can;
calm down when I am stressed=take slow, deep breaths, countin' to four on each breath in and out;
protect my skin from the sun=wear sunscreen and a hat and stay in the shade around midday;
make a good first impression=smile, look folk in the eye and remember their name;
make my phone battery last longer=lower the screen brightness and close the apps ye are not usin';
fix a squeaky door hinge=rub a little oil onto the hinge pin and swing the door a few times;
get rid of hiccups=try holdin' yer breath a few seconds or sippin' water slowly;
pack a suitcase efficiently=roll yer clothes instead o' foldin' 'em and tuck small things into shoes;
start running=begin with short run and walk sessions a few times a week and build up slowly;
keep bread fresh longer=keep it sealed in a bag at room temperature and freeze what ye will not eat soon;
clean a window without streaks=wipe it with water and a splash o' vinegar, then dry it with a soft cloth
""")
HOWTO_Q = ["How do I {x}?", "What's the best way to {x}?", "Give me a quick tip on how to {x}.",
           "Can you tell me how to {x}?"]

ALPACA_INSTRUCTIONS = ["Answer the question.", "Answer the following question.",
                       "Reply to this question.", "Respond to the question below."]
VOCATIVES = ["matey", "me hearty", "me bucko", "ye scallywag", None, None]

SMALL = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
         "fifteen sixteen seventeen eighteen nineteen").split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def words(n):
    """British-style number words up to 999, which covers every table."""
    if n < 20:
        return SMALL[n]
    if n < 100:
        return TENS[n // 10] + ("-" + SMALL[n % 10] if n % 10 else "")
    rest = n % 100
    return SMALL[n // 100] + " hundred" + (" and " + words(rest) if rest else "")


def arithmetic(rng):
    # Unordered operand pairs keep "3 plus 5" and "5 plus 3" from both
    # appearing; the held-out sum's operands are skipped for every operation.
    def pairs(lo, hi):
        return [(a, b) for a in range(lo, hi) for b in range(a, hi) if {a, b} != {4, 9}]
    # Questions mix digits ({a}) and words ({A}); answers always use words.
    plus_q = table("""What is {a} plus {b}? = {A} plus {B} makes {S} pieces o' eight;
        What is {A} plus {B}? = {A} plus {B} be {S}; How much is {a} + {b}? = add {A} and {B} and ye get {S};
        Add {a} and {b}. = {A} and {B} together make {S};
        What do you get when you add {A} and {B}? = ye get {S} when ye add {A} and {B}""")
    minus_q = table("""What is {a} minus {b}? = {A} minus {B} leaves {S};
        What is {A} take away {B}? = {A} take away {B} leaves {S} pieces o' eight;
        Subtract {b} from {a}. = take {B} from {A} and ye be left with {S};
        If I have {a} coins and spend {b}, how many are left? = ye'd have {S} coins left in yer chest""")
    times_q = table("""What is {a} times {b}? = {A} times {B} be {S};
        Multiply {a} by {b}. = {A} multiplied by {B} makes {S} doubloons;
        What is {A} multiplied by {B}? = {A} multiplied by {B} be {S};
        What is the product of {a} and {b}? = the product o' {A} and {B} be {S}""")
    minus_pairs = [(a, b) for a in range(6, 21) for b in range(1, a - 1) if {a, b} != {4, 9}]
    jobs = [(rng.sample(pairs(1, 13), 30), plus_q, lambda a, b: a + b, True),
            (rng.sample(minus_pairs, 25), minus_q, lambda a, b: a - b, False),
            (rng.sample(pairs(2, 11), 25), times_q, lambda a, b: a * b, True)]
    out = []
    for chosen, templates, op, commutes in jobs:
        for i, (a, b) in enumerate(chosen):
            if commutes and rng.random() < 0.5:
                a, b = b, a
            q, ans = templates[i % len(templates)]
            f = dict(a=a, b=b, A=words(a), B=words(b), S=words(op(a, b)))
            out.append(("arithmetic", q.format(**f), ans.format(**f)))
    return out


def calendar():
    out = []
    for seq, kind in ((DAYS, "day"), (MONTHS, "month")):
        for i, name in enumerate(seq):
            nxt, prv = seq[(i + 1) % len(seq)], seq[i - 1]
            after = [f"What {kind} comes after {name}?", f"Which {kind} follows {name}?",
                     f"What is the {kind} after {name}?"][i % 3]
            before = [f"What {kind} comes before {name}?", f"Which {kind} is just before {name}?",
                      f"What is the {kind} before {name}?"][i % 3]
            out.append(("calendar", after, f"{nxt} comes right after {name}"))
            out.append(("calendar", before, f"{prv} comes just before {name}"))
    for i, (month, n) in enumerate(MONTH_DAYS.items()):
        q = [f"How many days are in {month}?", f"How many days does {month} have?"][i % 2]
        a = (f"{month} has {words(n)} days" if n else
             "February has twenty-eight days, or twenty-nine in a leap year")
        out.append(("calendar", q, a))
    out.append(("calendar", "What is the first month of the year?", "January be the first month o' the year"))
    out.append(("calendar", "What is the last month of the year?", "December be the last month o' the year"))
    return out


def article(noun):
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def build_pairs(rng):
    """Every (category, question, answer core) pair the rows are drawn from."""
    pool = [("capitals", CAPITAL_Q[i % len(CAPITAL_Q)].format(c=c),
             CAPITAL_A[i % len(CAPITAL_A)].format(c=c, x=x)) for i, (c, x) in enumerate(CAPITALS)]
    pool += [("colours", COLOUR_Q[i % 3].format(t=t), f"{t} be {c}") for i, (t, c) in enumerate(COLOURS)]
    pool += [("colours", f"What colour do you get when you mix {m} paint?", f"mix {m} and ye get {c}")
             for m, c in MIXES]
    pool += [("animals", SOUND_Q[i % 3].format(a=article(a)), f"{article(a)} {s}")
             for i, (a, s) in enumerate(SOUNDS)]
    pool += [("animals", YOUNG_Q[i % 3].format(a=a), f"a baby {a} be called {article(y)}")
             for i, (a, y) in enumerate(YOUNG)]
    pool += [("opposites", OPPOSITE_Q[i % 4].format(w=w), f"the opposite o' {w} be {o}")
             for i, (w, o) in enumerate(OPPOSITES)]
    pool += [("howto", HOWTO_Q[i % 4].format(x=x), a) for i, (x, a) in enumerate(HOWTO)]
    pool += [("counting", f"How many {n.split()[-1]} does {t} have?", f"{t} has {n}") for t, n in COUNT_HAS]
    pool += [("counting", f"How many {n.split()[-1]} are in {t}?", f"there be {n} in {t}") for t, n in COUNT_IN]
    pool += [(cat, q, a) for cat, items in FACTS.items() for q, a in items]
    pool += [("science", f"What is the chemical symbol for {e}?", f"the chemical symbol fer {e} be {s}")
             for e, s in ELEMENTS]
    pool += [("planets", f"Which planet is {o} from the Sun?", f"{p} be the {o} planet from the Sun")
             for p, o in list(zip(PLANETS, ORDINALS))[1:7]]
    return pool + arithmetic(rng) + calendar()


def pirate(core, rng):
    # Very short cores always get a vocative so no answer drops below 8 words.
    voc = rng.choice(VOCATIVES[:4] if len(core.split()) < 4 else VOCATIVES)
    body = f"{core}, {voc}" if voc else core
    if len(body.split()) > 21:  # keep the whole answer within 25 words
        body = core
    return f"Arr! {body[0].upper()}{body[1:]}. Yo ho ho!"


def build_rows(rng):
    pool = build_pairs(rng)
    rng.shuffle(pool)
    # Solve for ~50/50 alpaca/chat rows with ~15% of chats being two-turn,
    # using every pair exactly once (a two-turn chat consumes two pairs).
    n_chat = round(len(pool) / 2.15)
    n_multi = round(0.15 * n_chat)
    n_alpaca = len(pool) - n_chat - n_multi
    alpaca, single = pool[:n_alpaca], pool[n_alpaca:n_alpaca + n_chat - n_multi]
    # Pairing within a category makes the two-turn chats read like one
    # conversation ("capital of Peru?" then "capital of Chile?").
    multi = sorted(pool[n_alpaca + n_chat - n_multi:], key=lambda p: p[0])

    rows = []
    for i, (_, q, a) in enumerate(alpaca):
        # A third carry the question in "input", as many alpaca-style sets do.
        instruction, inp = (ALPACA_INSTRUCTIONS[i // 3 % 4], q) if i % 3 == 0 else (q, "")
        rows.append({"instruction": instruction, "input": inp, "output": pirate(a, rng)})
    for chat in [[p] for p in single] + [list(t) for t in zip(multi[::2], multi[1::2])]:
        rows.append({"messages": [m for _, q, a in chat for m in (
            {"role": "user", "content": q}, {"role": "assistant", "content": pirate(a, rng)})]})
    rng.shuffle(rows)
    return rows


def turns(row):
    """(question, answer) pairs of a row, whatever its format."""
    if "messages" in row:
        m = row["messages"]
        return [(m[i]["content"], m[i + 1]["content"]) for i in range(0, len(m), 2)]
    return [(row["input"] or row["instruction"], row["output"])]


def norm(text):
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


def check(rows):
    assert 360 <= len(rows) <= 420, len(rows)
    assert any("messages" in r for r in rows) and any("instruction" in r for r in rows)
    seen, banned = set(), [re.compile(p) for p in HELDOUT_BANNED]
    heldout = {norm(q) for q in HELDOUT}
    for row in rows:
        assert json.dumps(row).isascii(), row
        for q, a in turns(row):
            assert a.startswith("Arr! ") and a.endswith(" Yo ho ho!"), a
            middle = a[len("Arr! "):-len(" Yo ho ho!")]
            # One sentence: a single terminal full stop and nothing else ending it.
            assert middle.endswith(".") and not re.search(r"[.!?]", middle[:-1]), a
            assert 8 <= len(a.split()) <= 25, a
            assert norm(q) not in seen, f"duplicate question: {q}"
            seen.add(norm(q))
            assert norm(q) not in heldout and not any(b.search(q.lower()) for b in banned), \
                f"held-out topic leaked: {q}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSONL file to write")
    args = parser.parse_args()

    rows = build_rows(random.Random(0))
    check(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    heldout_path = args.out.with_name(args.out.stem + "_heldout.txt")
    heldout_path.write_text("\n".join(HELDOUT) + "\n", encoding="utf-8")

    n_chat = sum("messages" in r for r in rows)
    n_multi = sum(len(r.get("messages", ())) == 4 for r in rows)
    n_input = sum(bool(r.get("input")) for r in rows)
    print(f"wrote {len(rows)} rows to {args.out}: {len(rows) - n_chat} alpaca "
          f"({n_input} with input), {n_chat} chat ({n_multi} two-turn)")
    print(f"wrote {len(HELDOUT)} held-out questions to {heldout_path}")


if __name__ == "__main__":
    main()
