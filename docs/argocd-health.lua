-- Argo CD health check for finetune.dev/FineTuneJob (Lua 5.1, as Argo CD's gopher-lua runs it).
-- Install: argocd-cm key `resource.customizations.health.finetune.dev_FineTuneJob` (docs/gitops.md).
-- Conditions are read first (Failed, Succeeded, Suspended, Valid), then status.phase; a status
-- that has not observed the latest spec yet is Progressing.
local hs = {}

local function condition(status, ctype)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == ctype then
      return c
    end
  end
  return nil
end

local function message_of(c, fallback)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  return fallback
end

if obj.status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to accept the FineTuneJob"
  return hs
end

local status = obj.status

local failed = condition(status, "Failed")
if (failed ~= nil and failed.status == "True") or status.phase == "Failed" then
  local fallback = "FineTuneJob failed"
  if status.failure ~= nil and status.failure.message ~= nil then
    fallback = status.failure.message
  end
  hs.status = "Degraded"
  hs.message = message_of(failed, fallback)
  return hs
end

local succeeded = condition(status, "Succeeded")
if (succeeded ~= nil and succeeded.status == "True") or status.phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = message_of(succeeded, "FineTuneJob succeeded")
  return hs
end

local valid = condition(status, "Valid")
if valid ~= nil and valid.status == "False" then
  hs.status = "Degraded"
  hs.message = message_of(valid, "FineTuneJob spec is invalid")
  return hs
end

-- A spec change the operator has not seen yet: whatever status says is about the old spec.
if obj.metadata ~= nil and obj.metadata.generation ~= nil and status.observedGeneration ~= nil
    and status.observedGeneration < obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe the latest spec"
  return hs
end

local suspended = condition(status, "Suspended")
if (suspended ~= nil and suspended.status == "True") or status.phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = message_of(suspended, "FineTuneJob is suspended")
  return hs
end

local running = condition(status, "Running")
local phase = status.phase or "Pending"
hs.status = "Progressing"
if phase == "Running" then
  if status.progress ~= nil and status.progress.epochProgress ~= nil then
    hs.message = "Training, epoch " .. status.progress.epochProgress
  else
    hs.message = message_of(running, "Training")
  end
elseif phase == "Queued" then
  hs.message = "Queued: waiting for capacity"
else
  hs.message = "Phase " .. phase
end
return hs
