"""The web chat page: one self-contained HTML file (no CDN), streaming from /v1/chat/completions."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ftq chat: __MODEL__</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font-family:system-ui,sans-serif;margin:0;display:flex;flex-direction:column;height:100vh;background:#f6f7f9}
header{padding:10px 16px;background:#1f2937;color:#fff;display:flex;gap:12px;align-items:center}
header span{opacity:.7;font-size:13px}
#log{flex:1;overflow-y:auto;padding:16px}
.msg{max-width:760px;margin:8px auto;padding:10px 14px;border-radius:10px;white-space:pre-wrap;line-height:1.4}
.user{background:#dbeafe}.assistant{background:#fff;border:1px solid #e5e7eb}.error{background:#fee2e2}
.call{background:#fef3c7;font-family:ui-monospace,monospace;font-size:13px}.tool{background:#ecfccb;font-family:ui-monospace,monospace;font-size:13px}
details{max-width:792px;margin:0 auto;width:100%;box-sizing:border-box;padding:0 12px}
#tools{width:100%;box-sizing:border-box;font-family:ui-monospace,monospace;font-size:12px}
form{display:flex;gap:8px;padding:12px;max-width:792px;margin:0 auto;width:100%;box-sizing:border-box}
textarea{flex:1;font:inherit;padding:8px;border-radius:8px;border:1px solid #cbd5e1;resize:none}
button{font:inherit;padding:8px 14px;border-radius:8px;border:0;background:#2563eb;color:#fff;cursor:pointer}
button.secondary{background:#64748b}button:disabled{opacity:.5}
#key{display:none;padding:6px;border-radius:6px;border:0}
</style></head><body>
<header><strong>ftq chat</strong><span id="model">__MODEL__</span><input id="key" type="password" placeholder="API key"></header>
<div id="log"></div>
<details><summary>Tools (OpenAI <code>tools</code> JSON list; calls appear here, and your next message is the call's result)</summary>
<textarea id="tools" rows="6" placeholder='[{"type": "function", "function": {"name": "lookup_order", "description": "...", "parameters": {...}}}]'></textarea></details>
<form id="form"><textarea id="input" rows="2" placeholder="Message (Enter to send, Shift+Enter for a new line)"></textarea>
<button id="send" type="submit">Send</button><button id="reset" class="secondary" type="button">New chat</button></form>
<script>
const needsKey = __NEEDS_KEY__;
const history = [];
let openCalls = [];  // calls still waiting for their result: the next message answers the first
const log = document.getElementById('log'), input = document.getElementById('input');
const send = document.getElementById('send'), keyField = document.getElementById('key');
if (needsKey) keyField.style.display = 'inline-block';
function bubble(role, text) {
  const div = document.createElement('div');
  div.className = 'msg ' + role; div.textContent = text; log.appendChild(div);
  log.scrollTop = log.scrollHeight; return div;
}
function showCall(call) {
  let args = call.function.arguments;
  try { args = JSON.stringify(JSON.parse(args), null, 2); } catch (e) {}
  return bubble('call', 'calls ' + call.function.name + '\\n' + args);
}
function toolsList() {
  const text = document.getElementById('tools').value.trim();
  if (!text) return null;
  return JSON.parse(text);  // a bad list fails the request with its parse error shown
}
async function ask(text) {
  if (openCalls.length) {
    const call = openCalls.shift();
    history.push({role: 'tool', tool_call_id: call.id, content: text});
    bubble('tool', call.function.name + ' returned\\n' + text);
  } else {
    history.push({role: 'user', content: text});
    bubble('user', text);
  }
  input.placeholder = 'Message (Enter to send, Shift+Enter for a new line)';
  const out = bubble('assistant', '');
  send.disabled = true;
  const headers = {'Content-Type': 'application/json'};
  if (keyField.value) headers['Authorization'] = 'Bearer ' + keyField.value;
  try {
    const request = {messages: history, stream: true, temperature: 0.7, max_tokens: __MAX_TOKENS__};
    const tools = toolsList();
    if (tools) request.tools = tools;
    const response = await fetch('/v1/chat/completions', {method: 'POST', headers, body: JSON.stringify(request)});
    if (!response.ok) { const body = await response.json(); throw new Error(body.error ? body.error.message : response.status); }
    const reader = response.body.getReader(); const decoder = new TextDecoder(); let buffer = '', reply = '';
    const calls = []; let shown = out;
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf('\\n\\n')) >= 0) {
        const line = buffer.slice(0, cut).trim(); buffer = buffer.slice(cut + 2);
        if (!line.startsWith('data:')) continue;
        const data = line.slice(5).trim();
        if (data === '[DONE]') continue;
        const choice = JSON.parse(data).choices[0];
        const delta = choice?.delta?.content;
        if (delta) { reply += delta; out.textContent = reply; log.scrollTop = log.scrollHeight; }
        for (const call of choice?.delta?.tool_calls || []) { calls.push(call); shown = showCall(call); }
      }
    }
    if (calls.length) {
      history.push({role: 'assistant', content: reply || null,
                    tool_calls: calls.map(c => ({id: c.id, type: 'function', function: c.function}))});
      if (!reply) out.remove(); else shown = out;
      openCalls = calls.slice();
      input.placeholder = 'Result of ' + calls[0].function.name + ' (sent as the tool message)';
    } else {
      history.push({role: 'assistant', content: reply});
    }
    shown.dataset.done = 'true';
  } catch (err) {
    history.pop(); out.className = 'msg error'; out.textContent = 'Error: ' + err.message;
  } finally { send.disabled = false; input.focus(); }
}
document.getElementById('form').addEventListener('submit', e => {
  e.preventDefault(); const text = input.value.trim(); if (!text || send.disabled) return; input.value = ''; ask(text);
});
input.addEventListener('keydown', e => { if (e.key === 'Enter' && !e.shiftKey) { e.preventDefault(); document.getElementById('form').requestSubmit(); } });
document.getElementById('reset').addEventListener('click', () => { history.length = 0; openCalls = []; log.innerHTML = ''; input.focus(); });
</script></body></html>
"""
