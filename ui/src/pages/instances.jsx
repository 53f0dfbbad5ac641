// Instances: the live list, CPU/memory sparklines from /v1/top/instances,
// a search box, a state filter, and the create dialog.
import { useEffect, useMemo, useRef, useState } from 'preact/hooks';
import { api } from '../api.js';
import { useFetch, useInterval, useLiveList } from '../live.js';
import { useSession } from '../session.js';
import { href } from '../route.js';
import { ErrorText, Field, FormDialog, Loading, Sparkline, StateBadge, Table, announce } from '../components/ui.jsx';
import { fmtBytes, fmtDuration, fmtMiB, since } from '../util.js';

const PHASES = ['pending', 'starting', 'running', 'stopping', 'stopped', 'failed', 'deleting'];

export function instancePhase(i) {
  if (i.spec.deleting) return 'deleting';
  return i.status.phase;
}

export function instanceType(i) {
  const r = i.spec.resources || {};
  return i.spec.instance_type || `custom ${r.vcpus} vCPU / ${fmtMiB(r.memory_mib)}`;
}

export function instanceAddrs(i) {
  const a = [];
  if (i.spec.network && i.spec.network.ip) a.push(i.spec.network.ip);
  for (const g of i.status.guest_addresses || []) if (!a.includes(g)) a.push(g);
  return a;
}

export function useInstances() {
  return useLiveList({
    list: '/v1/instances?limit=1000',
    item: (n) => `/v1/instances/${encodeURIComponent(n)}`,
    key: (i) => i.spec.name,
    objects: ['instance'],
  });
}

// CPU and memory history per VM from /v1/top/instances every 5 s.
function useTop(enabled) {
  const hist = useRef(new Map());
  const [, setTick] = useState(0);
  useInterval(() => {
    if (!enabled) return;
    api.get('/v1/top/instances').then((t) => {
      const seen = new Set();
      for (const s of t.vms || []) {
        if (s.project && s.project !== api.project) continue;
        // A stopped instance uses nothing: no sparkline (its configured
        // memory is not use).
        if (s.phase !== 'running') continue;
        seen.add(s.name);
        const h = hist.current.get(s.name) || { cpu: [], mem: [], last: null };
        const at = Date.parse(s.at);
        if (h.last && s.vcpu_seconds != null && h.last.vcpu_seconds != null && at > h.last.atMs) {
          const cpu = ((s.vcpu_seconds - h.last.vcpu_seconds) / ((at - h.last.atMs) / 1000)) * 100;
          h.cpu.push(Math.max(0, cpu));
        }
        if ((!h.last || at !== h.last.atMs) && s.rss_bytes != null) h.mem.push(s.rss_bytes);
        h.cpu = h.cpu.slice(-24); h.mem = h.mem.slice(-24);
        h.last = { ...s, atMs: at };
        hist.current.set(s.name, h);
      }
      for (const k of [...hist.current.keys()]) if (!seen.has(k)) hist.current.delete(k);
      setTick((x) => x + 1);
    }, () => { /* a metrics sample: skip a missed one */ });
  }, 5000, [enabled]);
  return hist.current;
}

export function InstancesPage() {
  const { perms } = useSession();
  const { items, error, upsert } = useInstances();
  const [q, setQ] = useState('');
  const [state, setState] = useState('');
  const [creating, setCreating] = useState(false);
  const top = useTop(true);
  const [, setNow] = useState(0);
  useInterval(() => setNow(Date.now()), 10000); // uptime text

  const shown = useMemo(() => (items || []).filter((i) => {
    if (state && instancePhase(i) !== state) return false;
    if (!q) return true;
    const hay = [i.spec.name, i.spec.kind, instancePhase(i), ...instanceAddrs(i), i.status.host, i.spec.host, i.spec.instance_type,
      ...Object.entries(i.spec.labels || {}).map(([k, v]) => `${k}=${v}`)].join(' ').toLowerCase();
    return hay.includes(q.toLowerCase());
  }), [items, q, state]);
  // Render the first PAGE matches; more as the end of the table nears.
  const PAGE = 100;
  const [limit, setLimit] = useState(PAGE);
  useEffect(() => setLimit(PAGE), [q, state]);
  const sentinel = useRef(null);
  useEffect(() => {
    const el = sentinel.current;
    if (!el) return undefined;
    const io = new IntersectionObserver((es) => { if (es.some((e) => e.isIntersecting)) setLimit((l) => l + 2 * PAGE); }, { rootMargin: '800px' });
    io.observe(el);
    return () => io.disconnect();
  });

  return (
    <section aria-labelledby="h-instances">
      <div class="page-head">
        <h1 id="h-instances">Instances</h1>
        {perms.canWrite && <button type="button" class="primary" data-testid="create-instance" onClick={() => setCreating(true)}>Create instance</button>}
      </div>
      <div class="filters" role="search">
        <label for="inst-search" class="sr-only">Search instances</label>
        <input id="inst-search" type="search" placeholder="Search name, IP, host, label…" value={q}
          data-testid="instance-search" onInput={(e) => setQ(e.currentTarget.value)} />
        <label for="inst-state" class="sr-only">State</label>
        <select id="inst-state" value={state} data-testid="instance-state-filter" onChange={(e) => setState(e.currentTarget.value)}>
          <option value="">All states</option>
          {PHASES.map((p) => <option key={p} value={p}>{p}</option>)}
        </select>
      </div>
      <ErrorText error={error} />
      {!items && !error ? <Loading what="instances" /> : items && (
        <Table caption="Instances" testid="instances-table"
          head={['Name', 'Kind', 'State', 'IP', 'Host', 'Type', 'Uptime', 'CPU', 'Memory']}
          empty={shown.length ? null : (items.length ? 'No instance matches.' : 'No instances yet.')}>
          {shown.slice(0, limit).map((i) => {
            const name = i.spec.name;
            const h = top.get(name);
            const phase = instancePhase(i);
            const up = phase === 'running' && i.status.started_at ? fmtDuration(since(i.status.started_at)) : '–';
            const cpuNow = h && h.cpu.length ? h.cpu[h.cpu.length - 1] : null;
            const memNow = h && h.mem.length ? h.mem[h.mem.length - 1] : null;
            return (
              <tr key={name} data-testid={`instance-row-${name}`}>
                <td data-label="Name"><a href={href('instances', name)}>{name}</a></td>
                <td data-label="Kind">{i.spec.kind || 'vm'}</td>
                <td data-label="State" data-testid="instance-state" data-state={phase}><StateBadge state={phase} />
                  {i.status.message && phase !== 'running' && <small class="muted block">{i.status.message}</small>}</td>
                <td data-label="IP">{instanceAddrs(i).join(', ') || '–'}</td>
                <td data-label="Host">{i.status.host || i.spec.host || '–'}</td>
                <td data-label="Type">{instanceType(i)}</td>
                <td data-label="Uptime">{up}</td>
                <td data-label="CPU" class="spark-cell">
                  <Sparkline values={h && h.cpu} max={Math.max(100 * (i.spec.resources.vcpus || 1), 1)} label={`CPU of ${name}`} />
                  <small>{cpuNow != null ? `${cpuNow.toFixed(0)}%` : ''}</small>
                </td>
                <td data-label="Memory" class="spark-cell">
                  <Sparkline values={h && h.mem} max={i.spec.resources.memory_mib * 1048576} label={`Memory of ${name}`} />
                  <small>{memNow != null ? fmtBytes(memNow, 0) : ''}</small>
                </td>
              </tr>
            );
          })}
        </Table>
      )}
      {items && shown.length > limit && (
        <p ref={sentinel} class="muted" data-testid="instances-more">
          Showing {limit} of {shown.length}. <button type="button" class="link" onClick={() => setLimit((l) => l + 2 * PAGE)}>Show more</button>
        </p>
      )}
      {creating && <CreateInstanceDialog onClose={() => setCreating(false)} onCreated={(i) => { upsert(i); announce(`Instance ${i.spec.name} created`); }} />}
    </section>
  );
}

function useOptions(path) {
  const { data, error } = useFetch(path);
  return error ? [] : data;
}

function parseLabels(text) {
  const labels = {};
  for (const raw of text.split(/[\n,]/)) {
    const s = raw.trim();
    if (!s) continue;
    const eq = s.indexOf('=');
    if (eq < 0) labels[s] = '';
    else labels[s.slice(0, eq).trim()] = s.slice(eq + 1).trim();
  }
  return labels;
}

function CheckList({ legend, name, items, value, onChange, empty }) {
  return (
    <fieldset class="checklist">
      <legend>{legend}</legend>
      {!items ? <span class="muted">Loading…</span> : items.length === 0 ? <span class="muted">{empty}</span> : items.map((it) => {
        const id = `${name}-${it}`;
        return (
          <label key={it} for={id} class="check">
            <input id={id} type="checkbox" checked={value.includes(it)}
              onChange={(e) => onChange(e.currentTarget.checked ? [...value, it] : value.filter((x) => x !== it))} />
            {it}
          </label>
        );
      })}
    </fieldset>
  );
}

export function CreateInstanceDialog({ onClose, onCreated, fromSnapshot }) {
  const types = useOptions('/v1/types');
  const images = useOptions('/v1/images');
  const volumes = useOptions('/v1/volumes?limit=1000');
  const networks = useOptions('/v1/networks');
  const sgs = useOptions('/v1/security-groups');
  const keypairs = useOptions('/v1/keypairs');
  const [f, setF] = useState({
    name: '', kind: 'vm', type: '', image: '', vcpus: '', memory_mib: '', disk_gib: '',
    volumes: [], root_volume: '', ha: '', disk_replicas: '', local_disk: false, network: '',
    security_groups: [], keys: [], user_data: '', labels: '', start: true,
  });
  const set = (k) => (e) => setF({ ...f, [k]: e.currentTarget.type === 'checkbox' ? e.currentTarget.checked : e.currentTarget.value });

  const typeValue = f.type || (types && types.length ? (types.find((t) => t.name === 'small') || types[0]).name : '');
  const imageChoices = (images || []).filter((im) => im.state === 'ready' && (f.kind === 'container' ? im.kind === 'rootfs' : im.kind !== 'rootfs'));
  const imageValue = f.image || (imageChoices[0] && imageChoices[0].name) || '';
  const freeVolumes = (volumes || []).filter((v) => !v.attached_to).map((v) => v.spec.name);

  const submit = async () => {
    let body;
    if (fromSnapshot) {
      body = { name: f.name.trim(), from_snapshot: fromSnapshot };
    } else {
      body = { name: f.name.trim(), image: imageValue };
      if (f.kind === 'container') body.kind = 'container';
      if (typeValue === '__custom') {
        body.vcpus = Number(f.vcpus) || null;
        body.memory_mib = Number(f.memory_mib) || null;
      } else body.instance_type = typeValue;
      if (f.disk_gib) body.disk_gib = Number(f.disk_gib);
      if (f.volumes.length) body.volumes = f.volumes;
      if (f.root_volume) body.root_volume = f.root_volume;
      if (f.ha) body.ha = f.ha;
      if (f.disk_replicas) body.disk_replicas = Number(f.disk_replicas);
      if (f.local_disk) body.local_disk = true;
      if (f.network) body.network = f.network;
      if (f.security_groups.length) body.security_groups = f.security_groups;
      if (f.keys.length) body.keys = f.keys;
      if (f.user_data.trim()) body.user_data = f.user_data;
      const labels = parseLabels(f.labels);
      if (Object.keys(labels).length) body.labels = labels;
      if (!f.start) body.start = false;
    }
    const inst = await api.post('/v1/instances', body);
    onCreated(inst);
  };

  return (
    <FormDialog title={fromSnapshot ? `Clone ${fromSnapshot}` : 'Create instance'} submitLabel={fromSnapshot ? 'Clone' : 'Create'}
      onSubmit={submit} onClose={onClose} testid="create-instance-dialog" wide>
      {(error) => (
        <div class="form-grid">
          <Field label="Name" name="name" error={error}>
            {(id, a) => <input id={id} {...a} required pattern="[a-z]([-a-z0-9]{0,61}[a-z0-9])?" autocomplete="off" spellcheck={false}
              value={f.name} onInput={set('name')} data-testid="create-name" />}
          </Field>
          {!fromSnapshot && (<>
            <Field label="Kind" name="kind" error={error}>
              {(id, a) => (
                <select id={id} {...a} value={f.kind} onChange={(e) => setF({ ...f, kind: e.currentTarget.value, image: '' })} data-testid="create-kind">
                  <option value="vm">vm</option>
                  <option value="container">container</option>
                </select>
              )}
            </Field>
            <Field label="Type" name="instance_type" error={error}>
              {(id, a) => (
                <select id={id} {...a} value={typeValue} onChange={set('type')} data-testid="create-type">
                  {!types && <option value="">Loading…</option>}
                  {(types || []).map((t) => <option key={t.name} value={t.name}>{t.name} — {t.resources.vcpus} vCPU, {fmtMiB(t.resources.memory_mib)}, {t.resources.disk_gib} GiB</option>)}
                  <option value="__custom">custom size…</option>
                </select>
              )}
            </Field>
            {typeValue === '__custom' && (<>
              <Field label="vCPUs" name="vcpus" error={error}>
                {(id, a) => <input id={id} {...a} type="number" min="1" max="255" value={f.vcpus} onInput={set('vcpus')} />}
              </Field>
              <Field label="Memory (MiB)" name="memory_mib" error={error}>
                {(id, a) => <input id={id} {...a} type="number" min="96" value={f.memory_mib} onInput={set('memory_mib')} />}
              </Field>
            </>)}
            <Field label="Image" name="image" error={error}>
              {(id, a) => (
                <select id={id} {...a} value={imageValue} onChange={set('image')} data-testid="create-image">
                  {!images && <option value="">Loading…</option>}
                  {images && !imageChoices.length && <option value="">no ready {f.kind === 'container' ? 'rootfs' : 'VM'} image</option>}
                  {imageChoices.map((im) => <option key={im.name} value={im.name}>{im.name} ({im.kind}{im.public ? ', public' : ''})</option>)}
                </select>
              )}
            </Field>
            <Field label="Root disk (GiB, optional)" name="disk_gib" error={error}>
              {(id, a) => <input id={id} {...a} type="number" min="1" value={f.disk_gib} onInput={set('disk_gib')} placeholder="type's size" />}
            </Field>
            <Field label="Network" name="network" error={error}>
              {(id, a) => (
                <select id={id} {...a} value={f.network} onChange={set('network')}>
                  <option value="">default</option>
                  {(networks || []).filter((n) => n.name !== 'default').map((n) => <option key={n.name} value={n.name}>{n.name} ({n.subnet})</option>)}
                </select>
              )}
            </Field>
            <Field label="HA when its host dies" name="ha" error={error}>
              {(id, a) => (
                <select id={id} {...a} value={f.ha} onChange={set('ha')}>
                  <option value="">default</option>
                  <option value="restart">restart elsewhere (protected)</option>
                  <option value="off">off</option>
                </select>
              )}
            </Field>
            <Field label="Root disk replicas" name="disk_replicas" error={error}>
              {(id, a) => (
                <select id={id} {...a} value={f.disk_replicas} onChange={set('disk_replicas')}>
                  <option value="">default</option>
                  <option value="1">1</option><option value="2">2</option><option value="3">3</option>
                </select>
              )}
            </Field>
            <Field label="Boot from volume (optional)" name="root_volume" error={error}>
              {(id, a) => (
                <select id={id} {...a} value={f.root_volume} onChange={set('root_volume')}>
                  <option value="">none (image disk)</option>
                  {freeVolumes.map((v) => <option key={v} value={v}>{v}</option>)}
                </select>
              )}
            </Field>
            <div class="field field-check">
              <label for="f-local_disk" class="check"><input id="f-local_disk" type="checkbox" checked={f.local_disk} onChange={set('local_disk')} /> Local disk (not replicated, not HA)</label>
              <label for="f-start" class="check"><input id="f-start" type="checkbox" checked={f.start} onChange={set('start')} /> Start at once</label>
            </div>
            <CheckList legend="Volumes to attach" name="vol" items={volumes && freeVolumes.filter((v) => v !== f.root_volume)} value={f.volumes}
              onChange={(v) => setF({ ...f, volumes: v })} empty="No free volumes." />
            <CheckList legend="Security groups" name="sg" items={sgs && sgs.map((s) => s.name)} value={f.security_groups}
              onChange={(v) => setF({ ...f, security_groups: v })} empty="None in this project." />
            <CheckList legend="Key pairs" name="key" items={keypairs && keypairs.map((k) => k.name)} value={f.keys}
              onChange={(v) => setF({ ...f, keys: v })} empty="None in this project." />
            <Field label="Labels (key=value, one per line)" name="labels" error={error}>
              {(id, a) => <textarea id={id} {...a} rows={2} value={f.labels} onInput={set('labels')} spellcheck={false} />}
            </Field>
            <Field label="Cloud-init user data" name="user_data" error={error} hint="#cloud-config YAML or a #! script, at most 16 KiB">
              {(id, a) => <textarea id={id} {...a} rows={4} value={f.user_data} onInput={set('user_data')} spellcheck={false} class="mono" />}
            </Field>
          </>)}
        </div>
      )}
    </FormDialog>
  );
}
