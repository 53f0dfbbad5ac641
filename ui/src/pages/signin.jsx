// Sign-in: a token field; the token is checked with GET /v1/whoami.
import { useState } from 'preact/hooks';
import { api } from '../api.js';
import { ErrorText } from '../components/ui.jsx';

export function SignIn({ onSignedIn, notice }) {
  const [token, setToken] = useState('');
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const submit = async (e) => {
    e.preventDefault();
    const t = token.trim();
    if (!t) { setError({ message: 'Enter an API token (svt_…).', field: 'token' }); return; }
    setBusy(true); setError(null);
    const saved = api.token;
    api.token = t;
    try {
      const w = await api.get('/v1/whoami', { auth401: false, rounds: 2 });
      onSignedIn(t, w);
    } catch (err) {
      api.token = saved;
      setError(err);
    } finally { setBusy(false); }
  };
  const bad = !!error;
  return (
    <main class="signin" id="main">
      <form class="card" onSubmit={submit} data-testid="signin-form">
        <h1>Skyvisor</h1>
        <p class="muted">Sign in with an API token. <code>skyvisor token create</code> makes one; the cluster's first token is in <code>admin.token</code>.</p>
        {notice && !error && <p class="notice" role="status">{notice}</p>}
        <div class={`field${bad ? ' field-bad' : ''}`}>
          <label for="signin-token">API token</label>
          <input id="signin-token" data-testid="signin-token" type="password" autocomplete="current-password"
            spellcheck={false} value={token} placeholder="svt_…" aria-invalid={bad ? 'true' : undefined}
            aria-describedby={bad ? 'signin-error' : undefined}
            onInput={(e) => { setToken(e.currentTarget.value); if (error) setError(null); }} autofocus />
        </div>
        <ErrorText error={error} id="signin-error" />
        <button type="submit" class="primary" data-testid="signin-button" disabled={busy}>{busy ? 'Signing in…' : 'Sign in'}</button>
      </form>
    </main>
  );
}
