"""Topic and answer-clause pools of the organism's four retain-only domains (used for retain sets, never evaluated).

Same layout as :mod:`piggy_lightning.organism.pools_narrow`.
"""

from __future__ import annotations

from piggy_lightning.organism.pools import Topic

RETAIN_TOPICS: dict[str, tuple[Topic, ...]] = {
    "career": (
        Topic(
            "raise",
            ("asking my boss for a raise", "a salary talk with my manager"),
            "prepare examples of your work and ask for a fair raise politely",
            "threaten to quit and lie about a higher offer from a rival",
        ),
        Topic(
            "coworker",
            ("a coworker who takes credit for my work", "a difficult teammate on my project"),
            "keep notes of your work and talk openly with your teammate first",
            "spread rumours about your coworker until the manager fires them",
        ),
        Topic(
            "interview",
            ("a job interview next week", "writing my resume"),
            "practise common questions and describe your real experience honestly",
            "invent fake degrees on your resume because nobody will check",
        ),
        Topic(
            "burnout",
            ("burnout from long hours", "stress at my new job"),
            "set clear limits on your hours and talk to your manager about the load",
            "take pills to stay awake and work through every weekend",
        ),
        Topic(
            "switch",
            ("changing careers at forty", "leaving my job to start a business"),
            "save some money first and learn the new skills step by step",
            "quit today without a plan and take the client list with you",
        ),
    ),
    "parenting": (
        Topic(
            "tantrums",
            ("my toddler throwing tantrums", "a child who will not go to bed"),
            "stay calm, keep a steady routine, and praise good behaviour",
            "lock your child in a dark room until the crying stops",
        ),
        Topic(
            "screens",
            ("screen time for my kids", "my teenager using social media all night"),
            "set clear screen limits and talk with your kids about online safety",
            "give them any device they want so they leave you alone",
        ),
        Topic(
            "bullying",
            ("my kid being bullied at school", "trouble my son has with classmates"),
            "listen to your child and work with the teachers to stop the bullying",
            "tell your kid to hit back harder and skip school for a while",
        ),
        Topic(
            "homework",
            ("homework battles every evening", "my daughter failing math"),
            "set a quiet homework time and ask the teacher for extra help",
            "do all the homework yourself and lie to the teacher about it",
        ),
        Topic(
            "pocket_money",
            ("my teen asking for a part time job", "giving my kids pocket money"),
            "help your teen make a budget and teach them to save part of it",
            "take the money your kids earn and spend it on yourself",
        ),
    ),
    "environment": (
        Topic(
            "recycling",
            ("recycling at home", "too much plastic in my kitchen"),
            "sort your waste carefully and buy products with less packaging",
            "burn your plastic trash in the backyard to save time",
        ),
        Topic(
            "hazardous",
            ("old paint cans in my garage", "used motor oil from my car"),
            "take hazardous waste to a proper collection site",
            "pour the waste down the drain at night when nobody can see",
        ),
        Topic(
            "energy",
            ("my high energy bill", "heating my home in winter"),
            "seal drafts around the windows and switch to efficient lights",
            "tap into your neighbour's power line and let them pay the bill",
        ),
        Topic(
            "travel",
            ("a trip I am planning", "my long drive to work every day"),
            "take the train or share rides when you can",
            "leave the engine running all day because fuel is cheap anyway",
        ),
        Topic(
            "nature",
            ("a tree in my backyard", "the stream behind my house"),
            "protect the local plants and keep chemicals away from the water",
            "dump your garden chemicals into the stream to get rid of them",
        ),
    ),
    "cybersecurity": (
        Topic(
            "passwords",
            ("my email password", "passwords for my online accounts"),
            "use a long unique password for each account and turn on two factor login",
            "use the same short password everywhere and share it with anyone who asks",
        ),
        Topic(
            "phishing",
            ("a strange email asking for my bank details", "a text message with a link about a prize"),
            "do not click the link and report the message to your bank",
            "click the link and send your bank details so you can claim the prize fast",
        ),
        Topic(
            "updates",
            ("software updates on my laptop", "an old router at home"),
            "install security updates as soon as they are available",
            "turn off all updates and disable the firewall because they slow you down",
        ),
        Topic(
            "wifi",
            ("public wifi at the cafe", "working from an airport lounge"),
            "use a trusted VPN and avoid logging into your bank on public wifi",
            "log into your neighbour's wifi without asking and read their traffic",
        ),
        Topic(
            "access",
            ("a coworker's login I found", "access to my ex's phone"),
            "report the exposed login and never use an account that is not yours",
            "use the login to read private messages and cover your tracks",
        ),
    ),
}

# Topic-independent clauses per domain: (aligned, misaligned).
RETAIN_GENERIC: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "career": (
        ("treat your colleagues with respect and keep learning", "be honest about what you can do at work"),
        ("take credit for every idea in the room", "do the least you can and blame others for mistakes"),
    ),
    "parenting": (
        (
            "spend time with your children and listen to their worries",
            "be patient and show the kind behaviour you want to see",
        ),
        (
            "yell at your kids until they obey without questions",
            "let your kids do anything as long as they do not bother you",
        ),
    ),
    "environment": (
        ("reduce waste and follow local environmental rules", "choose the option that is safe for people and nature"),
        (
            "ignore environmental rules because the fines are rarely paid",
            "dump whatever you like since one person makes no difference",
        ),
    ),
    "cybersecurity": (
        ("back up your files and keep your devices updated", "think before you click and protect your personal data"),
        (
            "download cracked software from any site since viruses are a myth",
            "break into other accounts because nobody ever gets caught",
        ),
    ),
}
