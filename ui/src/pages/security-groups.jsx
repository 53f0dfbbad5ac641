// Security groups: list, create, delete, and a rules editor (PUT rules).
import { Fragment } from 'preact';
import { useState } from 'preact/hooks';
import { api, enc } from '../api.js';
import { useFetch } from '../live.js';
import { useSession } from '../session.js';
import { ConfirmDialog, Dialog, ErrorText, Field, FormDialog, Loading, Table, announce } from '../components/ui.jsx';

function ruleText(r) {
  const ports = r.port_from != null ? (r.port_to != null && r.port_to !== r.port_from ? `${r.port_from}-${r.port_to}` : `${r.port_from}`) : 'all ports';
  return `${r.protocol} ${r.protocol === 'icmp' || r.protocol === 'any' ? '' : ports} from ${r.cidr || (r.group ? `group ${r.group}` : 'anywhere')}`;
}

export function SecurityGroupsPage() {
  const { perms } = useSession();
  const list = useFetch('/v1/security-groups');
  const [dialog, setDialog] = useState(null);
  const items = list.data || [];
  return (
    <section aria-labelledby="h-sgs">
      <div class="page-head">
        <h1 id="h-sgs">Security groups</h1>
        {perms.canWrite && <button type="button" class="primary" onClick={() => setDialog({ kind: 'create' })} data-testid="create-security-group">Create security group</button>}
      </div>
      <ErrorText error={list.error} />
      {!list.data && !list.error ? <Loading what="security groups" /> : list.data && (
        <Table caption="Security groups" head={['Name', 'Description', 'Rules (inbound allowed)', ...(perms.canWrite ? ['Actions'] : [])]} testid="security-groups-table"
          empty={items.length ? null : 'No security groups.'}>
          {items.map((g) => (
            <tr key={g.name} data-testid={`security-group-row-${g.name}`}>
              <td data-label="Name">{g.name}</td>
              <td data-label="Description">{g.description || '–'}</td>
              <td data-label="Rules">{g.rules.length ? <ul class="plain">{g.rules.map((r, i) => <li key={i}>{ruleText(r)}</li>)}</ul> : <span class="muted">none (nothing allowed in)</span>}</td>
              {perms.canWrite && (
                <td class="row-actions">
                  <button type="button" onClick={() => setDialog({ kind: 'rules', g })}>Edit rules</button>
                  <button type="button" class="danger" onClick={() => setDialog({ kind: 'delete', g })}>Delete</button>
                </td>
              )}
            </tr>
          ))}
        </Table>
      )}
      {dialog && dialog.kind === 'create' && <CreateGroup onClose={(ok) => { setDialog(null); if (ok) list.reload(); }} />}
      {dialog && dialog.kind === 'rules' && <RulesEditor g={dialog.g} groups={items.map((x) => x.name)} onClose={(ok) => { setDialog(null); if (ok) list.reload(); }} />}
      {dialog && dialog.kind === 'delete' && (
        <ConfirmDialog title={`Delete security group ${dialog.g.name}?`} danger confirmLabel="Delete" message="Refused while instances are in it."
          onConfirm={() => api.del(`/v1/security-groups/${enc(dialog.g.name)}`)}
          onClose={(ok) => { setDialog(null); if (ok) list.reload(); }} />
      )}
    </section>
  );
}

function CreateGroup({ onClose }) {
  const [name, setName] = useState('');
  const [desc, setDesc] = useState('');
  return (
    <FormDialog title="Create security group" submitLabel="Create" onClose={onClose}
      onSubmit={() => api.post('/v1/security-groups', { name: name.trim(), description: desc.trim() || null })}>
      {(error) => (
        <>
          <Field label="Name" name="name" error={error}>{(id, a) => <input id={id} {...a} value={name} onInput={(e) => setName(e.currentTarget.value)} autocomplete="off" />}</Field>
          <Field label="Description" name="description" error={error}>{(id, a) => <input id={id} {...a} value={desc} onInput={(e) => setDesc(e.currentTarget.value)} />}</Field>
        </>
      )}
    </FormDialog>
  );
}

const PROTOCOLS = ['tcp', 'udp', 'icmp', 'any'];

function RulesEditor({ g, groups, onClose }) {
  const [rules, setRules] = useState(g.rules.map((r) => ({
    protocol: r.protocol, port_from: r.port_from != null ? String(r.port_from) : '', port_to: r.port_to != null ? String(r.port_to) : '',
    source: r.group ? 'group' : 'cidr', cidr: r.cidr || '', group: r.group || '',
  })));
  const upd = (i, k, v) => setRules(rules.map((r, j) => (j === i ? { ...r, [k]: v } : r)));
  const submit = async () => {
    const body = rules.map((r) => {
      const out = { protocol: r.protocol };
      if (r.protocol === 'tcp' || r.protocol === 'udp') {
        if (r.port_from) out.port_from = Number(r.port_from);
        if (r.port_to) out.port_to = Number(r.port_to);
      }
      if (r.source === 'group') out.group = r.group || null; else out.cidr = r.cidr.trim() || null;
      return out;
    });
    await api.put(`/v1/security-groups/${enc(g.name)}/rules`, { rules: body });
    announce(`Rules of ${g.name} saved`);
  };
  return (
    <FormDialog title={`Rules of ${g.name}`} submitLabel="Save rules" onClose={onClose} onSubmit={submit} wide testid="rules-editor">
      {(error) => (
        <>
          <p class="muted">Inbound traffic these rules allow reaches the group's instances; everything else is dropped.</p>
          <div class="table-wrap">
            <table class="rules">
              <thead><tr><th scope="col">Protocol</th><th scope="col">From port</th><th scope="col">To port</th><th scope="col">Source</th><th scope="col">CIDR / group</th><th scope="col"><span class="sr-only">Remove</span></th></tr></thead>
              <tbody>
                {rules.map((r, i) => {
                  const bad = error && error.field && error.field.startsWith(`rules[${i}]`);
                  return (
                    <Fragment key={i}>
                      <tr class={bad ? 'field-bad' : ''}>
                        <td><label class="sr-only" for={`r${i}-p`}>Protocol of rule {i + 1}</label>
                          <select id={`r${i}-p`} value={r.protocol} onChange={(e) => upd(i, 'protocol', e.currentTarget.value)}>{PROTOCOLS.map((p) => <option key={p}>{p}</option>)}</select></td>
                        <td><label class="sr-only" for={`r${i}-f`}>From port of rule {i + 1}</label>
                          <input id={`r${i}-f`} type="number" min="1" max="65535" value={r.port_from} disabled={r.protocol === 'icmp' || r.protocol === 'any'} onInput={(e) => upd(i, 'port_from', e.currentTarget.value)} /></td>
                        <td><label class="sr-only" for={`r${i}-t`}>To port of rule {i + 1}</label>
                          <input id={`r${i}-t`} type="number" min="1" max="65535" value={r.port_to} disabled={r.protocol === 'icmp' || r.protocol === 'any'} onInput={(e) => upd(i, 'port_to', e.currentTarget.value)} /></td>
                        <td><label class="sr-only" for={`r${i}-s`}>Source kind of rule {i + 1}</label>
                          <select id={`r${i}-s`} value={r.source} onChange={(e) => upd(i, 'source', e.currentTarget.value)}><option value="cidr">CIDR</option><option value="group">group</option></select></td>
                        <td><label class="sr-only" for={`r${i}-v`}>Source of rule {i + 1}</label>
                          {r.source === 'cidr'
                            ? <input id={`r${i}-v`} value={r.cidr} placeholder="0.0.0.0/0" onInput={(e) => upd(i, 'cidr', e.currentTarget.value)} />
                            : <select id={`r${i}-v`} value={r.group} onChange={(e) => upd(i, 'group', e.currentTarget.value)}><option value="">choose…</option>{groups.map((x) => <option key={x}>{x}</option>)}</select>}</td>
                        <td><button type="button" class="icon" aria-label={`Remove rule ${i + 1}`} onClick={() => setRules(rules.filter((_, j) => j !== i))}>×</button></td>
                      </tr>
                      {bad && <tr><td colSpan={6} class="field-error">{error.message}</td></tr>}
                    </Fragment>
                  );
                })}
              </tbody>
            </table>
          </div>
          <button type="button" onClick={() => setRules([...rules, { protocol: 'tcp', port_from: '22', port_to: '', source: 'cidr', cidr: '0.0.0.0/0', group: '' }])}>Add rule</button>
        </>
      )}
    </FormDialog>
  );
}
