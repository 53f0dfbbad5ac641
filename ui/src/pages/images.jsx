// Images: list (kind, size, public/private, state), build from a recipe, delete.
import { useState } from 'preact/hooks';
import { api, enc } from '../api.js';
import { useFetch, useInterval, useLiveList } from '../live.js';
import { useSession } from '../session.js';
import { ConfirmDialog, ErrorText, Field, FormDialog, Loading, StateBadge, Table, announce } from '../components/ui.jsx';
import { ago, fmtBytes } from '../util.js';

export function ImagesPage() {
  const { perms, project } = useSession();
  const imgs = useLiveList({
    list: '/v1/images',
    item: (n) => `/v1/images/${enc(n)}`,
    key: (i) => i.name,
    objects: ['image'],
  });
  const [dialog, setDialog] = useState(null);
  const items = imgs.items || [];
  const building = items.filter((i) => i.state === 'building').map((i) => i.name);
  // A build's progress: refetch the images being built (not the list).
  useInterval(() => building.forEach((n) => imgs.refetch(n)), 3000, [building.join(',')]);
  return (
    <section aria-labelledby="h-images">
      <div class="page-head">
        <h1 id="h-images">Images</h1>
        {perms.canWrite && <button type="button" class="primary" onClick={() => setDialog({ kind: 'build' })} data-testid="build-image">Build image</button>}
      </div>
      <ErrorText error={imgs.error} />
      {!imgs.items && !imgs.error ? <Loading what="images" /> : imgs.items && (
        <Table caption="Images" head={['Name', 'Kind', 'State', 'Size', 'Visibility', 'Source', 'Created', ...(perms.canWrite ? ['Actions'] : [])]} testid="images-table"
          empty={items.length ? null : 'No images.'}>
          {items.map((i) => {
            const own = !i.project || i.project === project;
            return (
              <tr key={i.name} data-testid={`image-row-${i.name}`}>
                <td data-label="Name">{i.name}{i.description && <small class="muted block">{i.description}</small>}</td>
                <td data-label="Kind">{i.kind}</td>
                <td data-label="State"><StateBadge state={i.state} />{i.message && <small class="muted block">{i.message}</small>}</td>
                <td data-label="Size">{fmtBytes(i.files.reduce((s, f) => s + f.size_bytes, 0))}</td>
                <td data-label="Visibility">{i.public ? 'public' : 'private'}{!own && i.project ? ` (${i.project})` : ''}</td>
                <td data-label="Source">{i.source.type === 'recipe' ? `recipe ${i.source.recipe}` : 'import'}</td>
                <td data-label="Created">{ago(i.created_at)}</td>
                {perms.canWrite && <td class="row-actions">{own && <button type="button" class="danger" onClick={() => setDialog({ kind: 'delete', i })}>Delete</button>}</td>}
              </tr>
            );
          })}
        </Table>
      )}
      {dialog && dialog.kind === 'build' && <BuildDialog onClose={() => setDialog(null)} onDone={imgs.upsert} />}
      {dialog && dialog.kind === 'delete' && (
        <ConfirmDialog title={`Delete image ${dialog.i.name}?`} danger confirmLabel="Delete" message="Refused while instances use it."
          onConfirm={async () => { await api.del(`/v1/images/${enc(dialog.i.name)}`); imgs.remove(dialog.i.name); announce('Image deleted'); }}
          onClose={() => setDialog(null)} />
      )}
    </section>
  );
}

function BuildDialog({ onClose, onDone }) {
  const recipes = useFetch('/v1/recipes');
  const [name, setName] = useState('');
  const [recipe, setRecipe] = useState('');
  const list = recipes.data || [];
  const value = recipe || (list[0] && list[0].name) || '';
  return (
    <FormDialog title="Build image" submitLabel="Build" onClose={onClose}
      onSubmit={async () => { onDone(await api.post('/v1/images/build', { name: name.trim(), recipe: value })); announce('Build started'); }}>
      {(error) => (
        <>
          <Field label="Name" name="name" error={error}>{(id, a) => <input id={id} {...a} value={name} onInput={(e) => setName(e.currentTarget.value)} autocomplete="off" />}</Field>
          <Field label="Recipe" name="recipe" error={error}>
            {(id, a) => <select id={id} {...a} value={value} onChange={(e) => setRecipe(e.currentTarget.value)}>
              {list.map((r) => <option key={r.name} value={r.name}>{r.name} — {r.description}</option>)}
            </select>}
          </Field>
          <ErrorText error={recipes.error} />
        </>
      )}
    </FormDialog>
  );
}
