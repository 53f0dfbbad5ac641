// Volumes: size, replicas, replica health and resync progress; create,
// grow, change replicas, snapshots, attach/detach, delete (members).
import { Fragment } from 'preact';
import { useState } from 'preact/hooks';
import { api, enc } from '../api.js';
import { useFetch, useInterval, useLiveList } from '../live.js';
import { useSession } from '../session.js';
import { ConfirmDialog, ErrorText, Field, FormDialog, Loading, Progress, StateBadge, Table, announce } from '../components/ui.jsx';
import { ago, fmtBytes } from '../util.js';

const GiB = 1024 * 1024 * 1024;

export function VolumesPage() {
  const { perms } = useSession();
  const vols = useLiveList({
    list: '/v1/volumes?limit=1000',
    item: (n) => `/v1/volumes/${enc(n)}`,
    key: (v) => v.spec.name,
    objects: ['volume', 'volume-snapshot'],
    eventName: (ev) => ev.name.split('/')[0],
  });
  const [dialog, setDialog] = useState(null);
  const [open, setOpen] = useState(null);
  const items = vols.items || [];
  // Resync progress of replicas being copied (a progress poll of those volumes only).
  const resyncing = items.filter((v) => v.replicas.some((r) => r.state === 'resyncing') || ['creating', 'growing', 'deleting'].includes(v.status.phase));
  useInterval(() => resyncing.forEach((v) => vols.refetch(v.spec.name)), 2000, [resyncing.map((v) => v.spec.name).join(',')]);
  const close = (ok) => { setDialog(null); };
  const head = ['Name', 'Phase', 'Size', 'Replicas', 'Health', 'Attached to'];
  if (perms.canWrite) head.push('Actions');
  return (
    <section aria-labelledby="h-volumes">
      <div class="page-head">
        <h1 id="h-volumes">Volumes</h1>
        {perms.canWrite && <button type="button" class="primary" onClick={() => setDialog({ kind: 'create' })} data-testid="create-volume">Create volume</button>}
      </div>
      <ErrorText error={vols.error} />
      {!vols.items && !vols.error ? <Loading what="volumes" /> : vols.items && (
        <Table caption="Volumes" head={head} testid="volumes-table" empty={items.length ? null : 'No volumes.'}>
          {items.map((v) => {
            const n = v.spec.name;
            return (
              <Fragment key={n}>
                <tr data-testid={`volume-row-${n}`}>
                  <td data-label="Name"><button type="button" class="link" aria-expanded={open === n ? 'true' : 'false'} onClick={() => setOpen(open === n ? null : n)}>{n}</button></td>
                  <td data-label="Phase"><StateBadge state={v.spec.deleting ? 'deleting' : v.status.phase} />{v.status.message && <small class="muted block">{v.status.message}</small>}</td>
                  <td data-label="Size">{fmtBytes(v.status.size_bytes || v.spec.size_bytes)}</td>
                  <td data-label="Replicas">{v.redundancy.in_sync}/{v.redundancy.wanted} in sync</td>
                  <td data-label="Health"><StateBadge state={v.health} testid="volume-health" /></td>
                  <td data-label="Attached to">{v.attached_to ? <a href={`#/instances/${enc(v.attached_to.instance)}`}>{v.attached_to.instance}</a> : '–'}{v.attached_to && v.attached_to.root ? ' (root)' : ''}</td>
                  {perms.canWrite && (
                    <td data-label="Actions" class="row-actions">
                      <button type="button" onClick={() => setDialog({ kind: 'grow', v })}>Grow</button>
                      <button type="button" onClick={() => setDialog({ kind: 'replicas', v })}>Replicas</button>
                      {v.attached_to
                        ? <button type="button" disabled={v.attached_to.root} onClick={() => setDialog({ kind: 'detach', v })}>Detach</button>
                        : <button type="button" onClick={() => setDialog({ kind: 'attach', v })}>Attach</button>}
                      <button type="button" class="danger" onClick={() => setDialog({ kind: 'delete', v })}>Delete</button>
                    </td>
                  )}
                </tr>
                <tr class="sub-row">
                  <td colSpan={head.length}>
                    <ul class="replicas" aria-label={`Replicas of ${n}`}>
                      {v.replicas.map((r) => (
                        <li key={r.host}>
                          <span>{r.host}{r.read_source ? ' (primary)' : ''}</span> <StateBadge state={r.state} />
                          {r.state === 'resyncing' && r.resync_total_bytes > 0 && (
                            <span class="resync">
                              <Progress value={r.resync_done_bytes || 0} max={r.resync_total_bytes} label={`Resync of ${n} on ${r.host}`} />
                              {fmtBytes(r.resync_done_bytes || 0)} / {fmtBytes(r.resync_total_bytes)}
                            </span>
                          )}
                          {r.message && <small class="muted"> {r.message}</small>}
                        </li>
                      ))}
                    </ul>
                  </td>
                </tr>
                {open === n && <tr class="sub-row"><td colSpan={head.length}><VolumeSnapshots name={n} canWrite={perms.canWrite} /></td></tr>}
              </Fragment>
            );
          })}
        </Table>
      )}
      {dialog && dialog.kind === 'create' && <CreateVolume onClose={close} onDone={vols.upsert} />}
      {dialog && dialog.kind === 'grow' && (
        <SimpleForm title={`Grow ${dialog.v.spec.name}`} label="New size (GiB)" name="size_bytes" type="number"
          initial={String(Math.ceil(dialog.v.spec.size_bytes / GiB) + 1)} onClose={close}
          submit={async (val) => vols.upsert(await api.post(`/v1/volumes/${enc(dialog.v.spec.name)}/grow`, { size_bytes: Math.round(Number(val) * 1024) * 1048576 }))} />
      )}
      {dialog && dialog.kind === 'replicas' && <ReplicasDialog v={dialog.v} onClose={close} onDone={vols.upsert} />}
      {dialog && dialog.kind === 'attach' && <AttachDialog v={dialog.v} onClose={close} onDone={() => vols.refetch(dialog.v.spec.name)} />}
      {dialog && dialog.kind === 'detach' && (
        <ConfirmDialog title={`Detach ${dialog.v.spec.name}?`} confirmLabel="Detach"
          message={`It is unplugged from ${dialog.v.attached_to.instance}.`}
          onConfirm={async () => { await api.del(`/v1/instances/${enc(dialog.v.attached_to.instance)}/volumes/${enc(dialog.v.spec.name)}`); vols.refetch(dialog.v.spec.name); }}
          onClose={close} />
      )}
      {dialog && dialog.kind === 'delete' && (
        <ConfirmDialog title={`Delete volume ${dialog.v.spec.name}?`} danger confirmLabel="Delete"
          message="Its data and replicas are deleted."
          onConfirm={async () => { const r = await api.del(`/v1/volumes/${enc(dialog.v.spec.name)}`); if (r && r.spec) vols.upsert(r); announce('Volume deletion requested'); }}
          onClose={close} />
      )}
    </section>
  );
}

export function SimpleForm({ title, label, name, type = 'text', initial = '', submit, onClose, submitLabel = 'Save', hint }) {
  const [val, setVal] = useState(initial);
  return (
    <FormDialog title={title} submitLabel={submitLabel} onClose={onClose} onSubmit={() => submit(val)}>
      {(error) => (
        <Field label={label} name={name} error={error} hint={hint}>
          {(id, a) => <input id={id} {...a} type={type} value={val} onInput={(e) => setVal(e.currentTarget.value)} autocomplete="off" />}
        </Field>
      )}
    </FormDialog>
  );
}

function CreateVolume({ onClose, onDone }) {
  const [f, setF] = useState({ name: '', size: '10', replicas: '1' });
  const set = (k) => (e) => setF({ ...f, [k]: e.currentTarget.value });
  return (
    <FormDialog title="Create volume" submitLabel="Create" onClose={onClose} testid="create-volume-dialog"
      onSubmit={async () => {
        const body = { name: f.name.trim(), size_bytes: Math.round(Number(f.size) * 1024) * 1048576 };
        if (Number(f.replicas) > 1) body.replicas = Number(f.replicas);
        onDone(await api.post('/v1/volumes', body));
      }}>
      {(error) => (
        <>
          <Field label="Name" name="name" error={error}>{(id, a) => <input id={id} {...a} value={f.name} onInput={set('name')} autocomplete="off" />}</Field>
          <Field label="Size (GiB)" name="size_bytes" error={error}>{(id, a) => <input id={id} {...a} type="number" min="0.001" step="any" value={f.size} onInput={set('size')} />}</Field>
          <Field label="Replicas" name="replicas" error={error}>
            {(id, a) => <select id={id} {...a} value={f.replicas} onChange={set('replicas')}><option>1</option><option>2</option><option>3</option></select>}
          </Field>
        </>
      )}
    </FormDialog>
  );
}

function ReplicasDialog({ v, onClose, onDone }) {
  const hosts = useFetch('/v1/hosts');
  const [op, setOp] = useState('add');
  const [to, setTo] = useState('auto');
  const [from, setFrom] = useState(v.replicas[0] ? v.replicas[0].host : '');
  const have = new Set(v.replicas.map((r) => r.host));
  return (
    <FormDialog title={`Replicas of ${v.spec.name}`} submitLabel="Apply" onClose={onClose}
      onSubmit={async () => {
        const body = op === 'add' ? { to } : op === 'remove' ? { from } : { from, to };
        onDone(await api.post(`/v1/volumes/${enc(v.spec.name)}/replicas`, body));
      }}>
      {(error) => (
        <>
          <p class="muted">Now: {v.replicas.map((r) => `${r.host} (${r.state})`).join(', ') || 'none'}.</p>
          <Field label="Change" name="op" error={error}>
            {(id, a) => <select id={id} {...a} value={op} onChange={(e) => setOp(e.currentTarget.value)}>
              <option value="add">add a replica</option><option value="remove">remove a replica</option><option value="move">move a replica</option>
            </select>}
          </Field>
          {op !== 'add' && (
            <Field label="From host" name="from" error={error}>
              {(id, a) => <select id={id} {...a} value={from} onChange={(e) => setFrom(e.currentTarget.value)}>
                {v.replicas.map((r) => <option key={r.host} value={r.host}>{r.host}</option>)}
              </select>}
            </Field>
          )}
          {op !== 'remove' && (
            <Field label="To host" name="to" error={error}>
              {(id, a) => <select id={id} {...a} value={to} onChange={(e) => setTo(e.currentTarget.value)}>
                <option value="auto">automatic</option>
                {(hosts.data || []).filter((h) => !have.has(h.host.name)).map((h) => <option key={h.host.name} value={h.host.name}>{h.host.name}</option>)}
              </select>}
            </Field>
          )}
        </>
      )}
    </FormDialog>
  );
}

function AttachDialog({ v, onClose, onDone }) {
  const insts = useFetch('/v1/instances?limit=1000');
  const [inst, setInst] = useState('');
  const names = (insts.data || []).map((i) => i.spec.name);
  const value = inst || names[0] || '';
  return (
    <FormDialog title={`Attach ${v.spec.name}`} submitLabel="Attach" onClose={onClose}
      onSubmit={async () => { await api.post(`/v1/instances/${enc(value)}/volumes`, { volume: v.spec.name }); onDone(); }}>
      {(error) => (
        <Field label="Instance" name="instance" error={error}>
          {(id, a) => <select id={id} {...a} value={value} onChange={(e) => setInst(e.currentTarget.value)}>
            {names.map((n) => <option key={n} value={n}>{n}</option>)}
          </select>}
        </Field>
      )}
    </FormDialog>
  );
}

function VolumeSnapshots({ name, canWrite }) {
  const list = useFetch(`/v1/volumes/${enc(name)}/snapshots`);
  const [dialog, setDialog] = useState(null);
  const [error, setError] = useState(null);
  return (
    <div class="nested">
      <div class="page-head">
        <h3>Snapshots of {name}</h3>
        {canWrite && <button type="button" onClick={() => setDialog('take')}>Take snapshot</button>}
      </div>
      <ErrorText error={list.error || error} />
      {list.data && (
        <Table caption={`Snapshots of ${name}`} head={['Name', 'Size', 'Consistency', 'Hosts', 'Created', ...(canWrite ? [''] : [])]}
          empty={list.data.length ? null : 'No snapshots.'}>
          {list.data.map((s) => (
            <tr key={s.name}>
              <td data-label="Name">{s.name}</td>
              <td data-label="Size">{fmtBytes(s.size_bytes)}</td>
              <td data-label="Consistency">{s.consistency || '–'}</td>
              <td data-label="Hosts">{s.hosts.join(', ')}</td>
              <td data-label="Created">{ago(s.created_at)}</td>
              {canWrite && <td class="row-actions"><button type="button" class="danger" onClick={() => api.del(`/v1/volumes/${enc(name)}/snapshots/${enc(s.name)}`).then(list.reload, setError)}>Delete</button></td>}
            </tr>
          ))}
        </Table>
      )}
      {dialog === 'take' && (
        <SimpleForm title={`Snapshot ${name}`} label="Snapshot name" name="name" submitLabel="Take"
          submit={async (n) => { await api.post(`/v1/volumes/${enc(name)}/snapshots`, { name: n.trim() }); list.reload(); }}
          onClose={() => setDialog(null)} />
      )}
    </div>
  );
}
