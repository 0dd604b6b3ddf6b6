"""The omnilab demo: chat with Qwen3-Omni and watch its instruments on the last turn.

    omnilab demo [--model organism] [--port 7860]   # or, from the repository root:
    python -m apps.demo [--model organism] [--port 7860]

`serve` is the command line: it prints one line when the model is ready, and keeps everything the
server writes in one folder, removed on a clean stop (Ctrl-C, SIGTERM).

`layout` is the Gradio Blocks and their wiring; every handler calls a plain function that runs
without Gradio or a browser: `session` (a turn's inputs and settings, checked; one browser
session's state), `jobs` (the model jobs, one at a time under the model's lock) and `panels` (the
figures of the last turn, the players' audio, the downloads). The library never imports this app.

API endpoints for scripts (gradio_client): /chat (the streaming turn), /reply (the same turn, not
streamed: reply text and a WAV file), /routing, /positions, /speech, /residual_speech, /attention,
/attribute, /latency, /ablate, /trace_zip, /figures_html, /clear. /chat and /reply take, in order
and by these names (each with the app's default): text, audio, image, video, use_video_audio, system
(the model's default: `omnilab.models.presets.system_prompt`), voice, speak, max_new_tokens,
max_speech_frames, do_sample, temperature, top_p, top_k, seed, record_attention. Files go as uploads
(gradio_client.handle_file of a local path); a URL is refused before anything is fetched. Errors
reach gradio_client as plain text and browsers HTML-escaped (a raw HTTP script sends the header
`x-gradio-user: api` to get plain text). With attention on, a turn whose recording would pass the
memory budget (omnilab.instrument.budget) runs without attention and says so. A session's uploads
and downloads are deleted when it ends (the examples' files, which Gradio serves from its upload
folder, never are). /attribute takes the output token (an index into the last reply), the method
(integrated_gradients or feature_ablation) and the steps; /residual_speech takes how many codebooks
to keep (1-16) and returns the speech re-synthesized from codebooks 0..n-1.
"""
