"""The studio: a local web page (and its HTTP API) to prompt, watch, hear and jam with a model.

`midigen studio RUN_OR_MODEL...` serves it (`midigen.studio.app`); the pieces it is built from import no
web framework: the models it offers (`models`), the generation queue (`jobs`), the takes it keeps
(`takes`), prompts from uploads and the streamed generation (`generation`), audio to MIDI
(`transcription`), and `service.Studio`, which holds them together.
"""
