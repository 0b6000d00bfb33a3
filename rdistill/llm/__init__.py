"""Shared LLM inference for the stages that ask models questions (generate, evaluate, the merge
search): Ray Data batch inference through vLLM or any OpenAI-compatible endpoint (`batch`,
`spec`, `http`), and warm vLLM engines that take one model family's weights in turn (`warm`)."""
