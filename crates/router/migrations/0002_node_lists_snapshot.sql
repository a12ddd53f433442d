-- A copy of each node's lists (GPUs, runtimes, models, tags) on its row, written in the same transaction as the
-- child tables, so that start-up reads one row per node instead of every child row of the fleet. The child tables
-- stay the normalized record.
ALTER TABLE nodes ADD COLUMN lists TEXT;

UPDATE nodes SET lists = json_object(
    'gpu_devices', (SELECT json_group_array(json_array(model, count, memory_bytes)) FROM
        (SELECT model, count, memory_bytes FROM node_gpu_devices WHERE node_id = nodes.id ORDER BY position)),
    'supported_runtimes', (SELECT json_group_array(runtime) FROM
        (SELECT runtime FROM node_supported_runtimes WHERE node_id = nodes.id ORDER BY position)),
    'loaded_models', (SELECT json_group_array(model) FROM
        (SELECT model FROM node_loaded_models WHERE node_id = nodes.id AND kind = 'loaded' ORDER BY position)),
    'ready_models', (SELECT json_group_array(model) FROM
        (SELECT model FROM node_loaded_models WHERE node_id = nodes.id AND kind = 'ready' ORDER BY position)),
    'tags', (SELECT json_group_array(tag) FROM (SELECT tag FROM node_tags WHERE node_id = nodes.id ORDER BY position))
);
