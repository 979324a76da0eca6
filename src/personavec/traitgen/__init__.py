"""Write a trait file from a name and a description by asking a chat model (the paper's artifact generation).

The generator is any function from chat messages to the reply text; three are built from a spec string:

  openai:MODEL             an OpenAI-compatible endpoint ($OPENAI_BASE_URL or the OpenAI API), official client
  openai:MODEL@URL         the same at a given base URL (vLLM, llama.cpp, Ollama, `personavec serve`, ...)
  anthropic:MODEL[@URL]    the Anthropic Messages API (POST /v1/messages, x-api-key), $ANTHROPIC_API_KEY
  local[:MODEL]            a local Hugging Face chat model (default: the embedded one), greedy decoding

The reply must hold one JSON object (YAML is accepted too) with the prompt pairs, the two question sets, the
rubric and authored reference answers for every evaluation question (the independent `reference` measure); the name and description are the user's and never the model's. Each reply is validated against
the trait schema plus the generation targets (pair count, exactly `n_questions` per set); a failing reply is
answered with the list of problems and asked again, up to `retries` times, and then the run stops with the
problems listed. Nothing is written until a reply validates.

Modules: `prompts` (the conversation), `validation` (reading and checking a reply), `loop` (ask and correct),
`generators` (OpenAI, Anthropic, local), `writing` (the trait file)."""

from .generators import (
    ANTHROPIC_URL,
    ANTHROPIC_VERSION,
    anthropic_generator,
    local_generator,
    make_generator,
    openai_generator,
)
from .loop import DEFAULT_RETRIES, GeneratedTrait, Generator, generate_trait
from .prompts import N_QUESTIONS, RETRY_PROMPT, SYSTEM_PROMPT, USER_PROMPT, Message, build_messages
from .validation import parse_answer, validate_answer
from .writing import trait_yaml, write_trait_file

__all__ = ["ANTHROPIC_URL", "ANTHROPIC_VERSION", "DEFAULT_RETRIES", "N_QUESTIONS", "RETRY_PROMPT", "SYSTEM_PROMPT",
           "USER_PROMPT", "GeneratedTrait", "Generator", "Message", "anthropic_generator", "build_messages",
           "generate_trait", "local_generator", "make_generator", "openai_generator", "parse_answer",
           "trait_yaml", "validate_answer", "write_trait_file"]
