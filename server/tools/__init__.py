"""Tool calling and reasoning output for the chat endpoint (issue 12, parts 2 and 4).

Leaf modules, each one concept; the chat handler wires them (see each module's docstring):
  definitions.py  `tools`, `tool_choice`, `parallel_tool_calls` checked -> ToolRequest
  base.py         ToolParser / ToolCallStream, the interface (and the streamed == parsed invariant)
  calls.py        ToolCall, ParsedToolCalls, StreamDelta, ids, finish_reason
  hermes.py       `<tool_call>{...}</tool_call>` parser (non-streaming and streaming)
  llama3_json.py  Llama-3.1 `{"name": ..., "parameters": ...}` parser
  parsers.py      --tool-call-parser names -> parser, `auto` detection from the chat template
  prompting.py    tools into the system turn for templates that ignore `tools`; tool messages
  grammar.py      tool_choice "required" / named -> Lark grammar text for llguidance
  reasoning.py    `<think>...</think>` -> reasoning_content + content (non-streaming, streaming)
  chat_output.py  a choice's text -> reasoning, content, tool calls (whole or streamed)
"""
