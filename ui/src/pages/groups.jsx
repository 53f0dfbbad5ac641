// Groups: members and their health, scale, autoscale, create, delete.
import { useRef, useState } from 'preact/hooks';
import { api, enc } from '../api.js';
import { useFetch, useLiveList } from '../live.js';
import { useSession } from '../session.js';
import { ConfirmDialog, ErrorText, Field, FormDialog, Loading, StateBadge, Table, announce } from '../components/ui.jsx';
import { ago } from '../util.js';

export function GroupsPage() {
  const { perms } = useSession();
  const itemsRef = useRef([]);
  const groups = useLiveList({
    list: '/v1/groups',
    item: (n) => `/v1/groups/${enc(n)}`,
    key: (g) => g.spec.name,
    objects: ['group', 'instance'],
    // A member's events change its group's health: refetch that group.
    eventName: (ev) => {
      if (ev.object === 'group') return ev.name;
      const g = itemsRef.current.find((x) => x.members.some((m) => m.name === ev.name));
      return g ? g.spec.name : null;
    },
  });
  itemsRef.current = groups.items || [];
  const [dialog, setDialog] = useState(null);
  const close = () => setDialog(null);
  const items = groups.items || [];
  return (
    <section aria-labelledby="h-groups">
      <div class="page-head">
        <h1 id="h-groups">Groups</h1>
        {perms.canWrite && <button type="button" class="primary" onClick={() => setDialog({ kind: 'create' })} data-testid="create-group">Create group</button>}
      </div>
      <ErrorText error={groups.error} />
      {!groups.items && !groups.error ? <Loading what="groups" /> : groups.items && (
        <Table caption="Groups" head={['Name', 'Size', 'Healthy', 'Members', 'Autoscale', ...(perms.canWrite ? ['Actions'] : [])]} testid="groups-table"
          empty={items.length ? null : 'No groups.'}>
          {items.map((g) => {
            const s = g.spec;
            return (
              <tr key={s.name} data-testid={`group-row-${s.name}`}>
                <td data-label="Name">{s.name}{s.deleting && <small class="muted block">deleting</small>}{g.message && <small class="muted block">{g.message}</small>}</td>
                <td data-label="Size">{s.desired} <small class="muted">({s.min}–{s.max})</small></td>
                <td data-label="Healthy">{g.healthy}/{g.members.length}</td>
                <td data-label="Members">
                  <ul class="plain">
                    {g.members.map((m) => (
                      <li key={m.name}><a href={`#/instances/${enc(m.name)}`}>{m.name}</a> <StateBadge state={m.phase} /> <StateBadge state={m.health} />
                        <small class="muted"> {m.ip}{m.host ? ` on ${m.host}` : ''}{m.leaving ? ', leaving' : ''}</small></li>
                    ))}
                  </ul>
                </td>
                <td data-label="Autoscale">{s.autoscale
                  ? <>{s.autoscale.target_cpu_percent != null ? `CPU ${s.autoscale.target_cpu_percent}%` : ''}{s.autoscale.target_requests_per_member != null ? ` ${s.autoscale.target_requests_per_member} req/member` : ''}
                    {g.autoscaled && <small class="muted block">{g.autoscaled.from}→{g.autoscaled.to} {ago(g.autoscaled.at)}: {g.autoscaled.reason}</small>}</>
                  : <span class="muted">off</span>}</td>
                {perms.canWrite && (
                  <td class="row-actions">
                    <button type="button" onClick={() => setDialog({ kind: 'scale', g })}>Scale</button>
                    <button type="button" onClick={() => setDialog({ kind: 'autoscale', g })}>Autoscale</button>
                    <button type="button" class="danger" onClick={() => setDialog({ kind: 'delete', g })}>Delete</button>
                  </td>
                )}
              </tr>
            );
          })}
        </Table>
      )}
      {dialog && dialog.kind === 'create' && <CreateGroup onClose={close} onDone={groups.upsert} />}
      {dialog && dialog.kind === 'scale' && <ScaleDialog g={dialog.g} onClose={close} onDone={groups.upsert} />}
      {dialog && dialog.kind === 'autoscale' && <AutoscaleDialog g={dialog.g} onClose={close} onDone={groups.upsert} />}
      {dialog && dialog.kind === 'delete' && (
        <ConfirmDialog title={`Delete group ${dialog.g.spec.name}?`} danger confirmLabel="Delete" message="Its members are deleted too."
          onConfirm={async () => { const r = await api.del(`/v1/groups/${enc(dialog.g.spec.name)}`); if (r && r.spec) groups.upsert(r); }}
          onClose={close} />
      )}
    </section>
  );
}

function num(v) { return v === '' || v == null ? null : Number(v); }

function CreateGroup({ onClose, onDone }) {
  const types = useFetch('/v1/types');
  const images = useFetch('/v1/images');
  const [f, setF] = useState({ name: '', image: '', type: 'small', desired: '2', min: '', max: '', port: '' });
  const set = (k) => (e) => setF({ ...f, [k]: e.currentTarget.value });
  const imgs = (images.data || []).filter((i) => i.state === 'ready' && i.kind !== 'rootfs');
  const image = f.image || (imgs[0] && imgs[0].name) || '';
  return (
    <FormDialog title="Create group" submitLabel="Create" onClose={onClose}
      onSubmit={async () => {
        const body = { name: f.name.trim(), template: { image, instance_type: f.type }, desired: num(f.desired) };
        if (f.min) body.min = num(f.min);
        if (f.max) body.max = num(f.max);
        if (f.port) body.health_check = { port: num(f.port) };
        onDone(await api.post('/v1/groups', body));
      }}>
      {(error) => (
        <>
          <Field label="Name" name="name" error={error}>{(id, a) => <input id={id} {...a} value={f.name} onInput={set('name')} autocomplete="off" />}</Field>
          <Field label="Image" name="template.image" error={error}>{(id, a) => <select id={id} {...a} value={image} onChange={set('image')}>{imgs.map((i) => <option key={i.name}>{i.name}</option>)}</select>}</Field>
          <Field label="Type" name="template.instance_type" error={error}>{(id, a) => <select id={id} {...a} value={f.type} onChange={set('type')}>{(types.data || []).map((t) => <option key={t.name}>{t.name}</option>)}</select>}</Field>
          <Field label="Desired size" name="desired" error={error}>{(id, a) => <input id={id} {...a} type="number" min="0" value={f.desired} onInput={set('desired')} />}</Field>
          <Field label="Min (optional)" name="min" error={error}>{(id, a) => <input id={id} {...a} type="number" min="0" value={f.min} onInput={set('min')} />}</Field>
          <Field label="Max (optional)" name="max" error={error}>{(id, a) => <input id={id} {...a} type="number" min="0" value={f.max} onInput={set('max')} />}</Field>
          <Field label="Health check TCP port (optional)" name="health_check" error={error}>{(id, a) => <input id={id} {...a} type="number" min="1" max="65535" value={f.port} onInput={set('port')} />}</Field>
        </>
      )}
    </FormDialog>
  );
}

function ScaleDialog({ g, onClose, onDone }) {
  const [f, setF] = useState({ desired: String(g.spec.desired), min: String(g.spec.min), max: String(g.spec.max) });
  const set = (k) => (e) => setF({ ...f, [k]: e.currentTarget.value });
  return (
    <FormDialog title={`Scale ${g.spec.name}`} submitLabel="Scale" onClose={onClose}
      onSubmit={async () => { onDone(await api.post(`/v1/groups/${enc(g.spec.name)}/scale`, { desired: num(f.desired), min: num(f.min), max: num(f.max) })); announce('Scaled'); }}>
      {(error) => (
        <>
          <Field label="Desired" name="desired" error={error}>{(id, a) => <input id={id} {...a} type="number" min="0" value={f.desired} onInput={set('desired')} />}</Field>
          <Field label="Min" name="min" error={error}>{(id, a) => <input id={id} {...a} type="number" min="0" value={f.min} onInput={set('min')} />}</Field>
          <Field label="Max" name="max" error={error}>{(id, a) => <input id={id} {...a} type="number" min="0" value={f.max} onInput={set('max')} />}</Field>
        </>
      )}
    </FormDialog>
  );
}

function AutoscaleDialog({ g, onClose, onDone }) {
  const a0 = g.spec.autoscale || {};
  const [f, setF] = useState({
    cpu: a0.target_cpu_percent != null ? String(a0.target_cpu_percent) : '60',
    req: a0.target_requests_per_member != null ? String(a0.target_requests_per_member) : '',
    window: a0.window_secs != null ? String(a0.window_secs) : '',
    off: false,
  });
  const set = (k) => (e) => setF({ ...f, [k]: e.currentTarget.type === 'checkbox' ? e.currentTarget.checked : e.currentTarget.value });
  return (
    <FormDialog title={`Autoscale ${g.spec.name}`} submitLabel="Save" onClose={onClose}
      onSubmit={async () => {
        if (f.off) { onDone(await api.del(`/v1/groups/${enc(g.spec.name)}/autoscale`)); return; }
        const body = {};
        if (f.cpu) body.target_cpu_percent = num(f.cpu);
        if (f.req) body.target_requests_per_member = num(f.req);
        if (f.window) body.window_secs = num(f.window);
        onDone(await api.put(`/v1/groups/${enc(g.spec.name)}/autoscale`, body));
      }}>
      {(error) => (
        <>
          <Field label="Target CPU %" name="target_cpu_percent" error={error}>{(id, a) => <input id={id} {...a} type="number" min="1" max="100" value={f.cpu} onInput={set('cpu')} disabled={f.off} />}</Field>
          <Field label="Target requests per member (optional)" name="target_requests_per_member" error={error}>{(id, a) => <input id={id} {...a} type="number" min="1" value={f.req} onInput={set('req')} disabled={f.off} />}</Field>
          <Field label="Window (seconds, optional)" name="window_secs" error={error}>{(id, a) => <input id={id} {...a} type="number" min="1" value={f.window} onInput={set('window')} disabled={f.off} />}</Field>
          {g.spec.autoscale && <label class="check" for="as-off"><input id="as-off" type="checkbox" checked={f.off} onChange={set('off')} /> Turn autoscaling off</label>}
        </>
      )}
    </FormDialog>
  );
}
