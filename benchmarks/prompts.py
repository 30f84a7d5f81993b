"""Prompts in the style of the embedded default's four reasoning-gym families (46-58 tokens with
SmolLM2's chat template), shared by the serving and routing benchmarks; `{a}` and `{b}` take
numbers so that no two requests are the same text."""

QUESTIONS = [
    "What is {a} + {b} - 7? Answer with the number only.",
    "Solve the following multiplication: {a} * {b}. Give only the result.",
    "Spell this word backward (example: sun -> nus): garden{a}",
    'How many times does the letter "r" appear in the text: "berry {a} farmers rarely rest"?',
]
