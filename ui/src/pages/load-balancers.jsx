// Load balancers: address, group, listeners, backends with member health.
import { useState } from 'preact/hooks';
import { api, enc } from '../api.js';
import { useFetch, useLiveList } from '../live.js';
import { useSession } from '../session.js';
import { ConfirmDialog, ErrorText, Field, FormDialog, Loading, StateBadge, Table } from '../components/ui.jsx';

export function LoadBalancersPage() {
  const { perms } = useSession();
  const lbs = useLiveList({
    list: '/v1/load-balancers',
    item: (n) => `/v1/load-balancers/${enc(n)}`,
    key: (l) => l.spec.name,
    objects: ['load-balancer'],
  });
  const groups = useFetch('/v1/groups');
  const health = new Map();
  for (const g of groups.data || []) for (const m of g.members) health.set(m.name, m.health);
  const [dialog, setDialog] = useState(null);
  const items = lbs.items || [];
  return (
    <section aria-labelledby="h-lbs">
      <div class="page-head">
        <h1 id="h-lbs">Load balancers</h1>
        {perms.canWrite && <button type="button" class="primary" onClick={() => setDialog({ kind: 'create' })} data-testid="create-load-balancer">Create load balancer</button>}
      </div>
      <ErrorText error={lbs.error} />
      {!lbs.items && !lbs.error ? <Loading what="load balancers" /> : lbs.items && (
        <Table caption="Load balancers" head={['Name', 'Address', 'Listeners', 'Group', 'Backends', ...(perms.canWrite ? ['Actions'] : [])]} testid="load-balancers-table"
          empty={items.length ? null : 'No load balancers.'}>
          {items.map((l) => (
            <tr key={l.spec.name} data-testid={`lb-row-${l.spec.name}`}>
              <td data-label="Name">{l.spec.name}<small class="muted block">{l.spec.algorithm}</small></td>
              <td data-label="Address">{l.spec.address}{(l.external_endpoints || []).map((e) => <small key={e} class="block">{e}</small>)}</td>
              <td data-label="Listeners">{l.spec.listeners.map((x) => `${x.protocol || 'tcp'} ${x.port}${x.target_port && x.target_port !== x.port ? `→${x.target_port}` : ''}`).join(', ')}</td>
              <td data-label="Group"><a href="#/groups">{l.spec.group}</a></td>
              <td data-label="Backends">
                {l.backends.length ? (
                  <ul class="plain">{l.backends.map((b) => (
                    <li key={b.member}>{b.member} <small class="muted">{b.ip}</small> <StateBadge state={b.state} /> <StateBadge state={health.get(b.member) || 'unknown'} /></li>
                  ))}</ul>
                ) : <span class="muted">none</span>}
              </td>
              {perms.canWrite && <td class="row-actions"><button type="button" class="danger" onClick={() => setDialog({ kind: 'delete', l })}>Delete</button></td>}
            </tr>
          ))}
        </Table>
      )}
      {dialog && dialog.kind === 'create' && <CreateLb groups={(groups.data || []).map((g) => g.spec.name)} onClose={() => setDialog(null)} onDone={lbs.upsert} />}
      {dialog && dialog.kind === 'delete' && (
        <ConfirmDialog title={`Delete load balancer ${dialog.l.spec.name}?`} danger confirmLabel="Delete" message="Its address stops answering."
          onConfirm={async () => { await api.del(`/v1/load-balancers/${enc(dialog.l.spec.name)}`); lbs.remove(dialog.l.spec.name); }}
          onClose={() => setDialog(null)} />
      )}
    </section>
  );
}

function CreateLb({ groups, onClose, onDone }) {
  const [f, setF] = useState({ name: '', group: '', port: '80', target: '', protocol: 'tcp', external: false, algorithm: 'round-robin' });
  const set = (k) => (e) => setF({ ...f, [k]: e.currentTarget.type === 'checkbox' ? e.currentTarget.checked : e.currentTarget.value });
  const group = f.group || groups[0] || '';
  return (
    <FormDialog title="Create load balancer" submitLabel="Create" onClose={onClose}
      onSubmit={async () => {
        const listener = { port: Number(f.port), protocol: f.protocol };
        if (f.target) listener.target_port = Number(f.target);
        onDone(await api.post('/v1/load-balancers', { name: f.name.trim(), group, listeners: [listener], external: f.external, algorithm: f.algorithm }));
      }}>
      {(error) => (
        <>
          <Field label="Name" name="name" error={error}>{(id, a) => <input id={id} {...a} value={f.name} onInput={set('name')} autocomplete="off" />}</Field>
          <Field label="Group" name="group" error={error}>{(id, a) => <select id={id} {...a} value={group} onChange={set('group')}>{groups.map((g) => <option key={g}>{g}</option>)}</select>}</Field>
          <Field label="Port" name="listeners" error={error}>{(id, a) => <input id={id} {...a} type="number" min="1" max="65535" value={f.port} onInput={set('port')} />}</Field>
          <Field label="Target port (optional)" name="target_port" error={error}>{(id, a) => <input id={id} {...a} type="number" min="1" max="65535" value={f.target} onInput={set('target')} />}</Field>
          <Field label="Protocol" name="protocol" error={error}>{(id, a) => <select id={id} {...a} value={f.protocol} onChange={set('protocol')}><option>tcp</option><option>http</option></select>}</Field>
          <Field label="Algorithm" name="algorithm" error={error}>{(id, a) => <select id={id} {...a} value={f.algorithm} onChange={set('algorithm')}><option>round-robin</option><option>least-connections</option></select>}</Field>
          <label class="check" for="lb-ext"><input id="lb-ext" type="checkbox" checked={f.external} onChange={set('external')} /> External (reachable from outside the cloud)</label>
        </>
      )}
    </FormDialog>
  );
}
