from matcher.grouping import groups_sharing


def test_items_sharing_a_key_directly_or_through_others_are_one_group_in_first_seen_order():
    items = ["a:x", "b:y", "c:z", "d:y,z", "e:w"]
    keys = {item: item.split(":")[1].split(",") for item in items}
    assert groups_sharing(items, keys.__getitem__) == [["a:x"], ["b:y", "c:z", "d:y,z"], ["e:w"]]


def test_items_without_keys_stay_alone():
    assert groups_sharing([1, 2], lambda item: []) == [[1], [2]]
